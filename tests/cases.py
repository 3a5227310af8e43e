"""Hand-solved linear assignment problems, shared by every solver's tests.

Each case is ``(name, cost, min_total)``: the minimum total cost over one-to-one assignments that cover
the smaller side, worked out by hand (the comment says how). Tests run each case as given, transposed,
and negated with ``maximize=True``. A *list*, so it can be iterated more than once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

LAP_CASES: list[tuple[str, Any, float]] = [
    # One entry: the only assignment.
    ("single", [[5.0]], 5.0),
    # Diagonal 4+0=4, anti-diagonal 1+2=3.
    ("two_by_two", [[4.0, 1.0], [2.0, 0.0]], 3.0),
    # scipy's docstring example: rows 0,1,2 -> cols 1,0,2 = 1+2+2.
    ("scipy_doc", [[4, 1, 3], [2, 0, 5], [3, 2, 2]], 5.0),
    # Greedy trap: row 0 grabs its cheapest col 0 (0), forcing row 1 onto 100; optimum is 1+1.
    ("greedy_trap", [[0.0, 1.0], [1.0, 100.0]], 2.0),
    # Every assignment ties (scipy issue #11602): 4*7.
    ("constant", [[7.0] * 4 for _ in range(4)], 28.0),
    # Negative costs: -5 (0->1) + -3 (1->0) = -8 beats -1 + -2 = -3.
    ("negative", [[-1.0, -5.0], [-3.0, -2.0]], -8.0),
    # Wide: both rows take their own 1; the third column stays free.
    ("wide", [[1.0, 2.0, 3.0], [3.0, 1.0, 2.0]], 2.0),
    # Tall: columns pick rows 2 (0) and 0 (1); row 1 stays free.
    ("tall", [[1.0, 9.0], [5.0, 5.0], [9.0, 0.0]], 1.0),
    # Planted: 10 everywhere except cost[i, sigma(i)] = i for sigma = (3, 0, 4, 1, 2): 0+1+2+3+4.
    (
        "planted_5",
        [
            [10, 10, 10, 0, 10],
            [1, 10, 10, 10, 10],
            [10, 10, 10, 10, 2],
            [10, 3, 10, 10, 10],
            [10, 10, 4, 10, 10],
        ],
        10.0,
    ),
    # Bool input: the two off-diagonal zeros.
    ("bool", [[True, False], [False, True]], 0.0),
    # Integer 6x6: row i, col j costs |i - j| except the anti-diagonal costs 0 -> anti-diagonal, total 0.
    ("anti_diagonal_6", [[0 if i + j == 5 else abs(i - j) + 1 for j in range(6)] for i in range(6)], 0.0),
    # Empty problems have total 0.
    ("empty_0x0", np.zeros((0, 0)), 0.0),
    ("empty_2x0", np.zeros((2, 0)), 0.0),
    ("empty_0x3", np.zeros((0, 3)), 0.0),
]
"""``(name, cost, min_total)`` for :func:`saematch_core.lap.linear_assignment` and the brute force."""
