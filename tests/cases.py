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
    # A larger constant matrix (scipy's regression for #11602 uses 8 × 8): 8 * 1.
    ("constant_8", np.ones((8, 8)), 8.0),
    # scipy's hand-solved cases (its csgraph matching tests, shared with linear_sum_assignment).
    # Rows take columns 1, 0, 2: 150 + 400 + 300 (the alternatives 400 + 450 + 300, 150 + 600 + 300,
    # ... are larger).
    ("scipy_square", [[400, 150, 400], [400, 450, 600], [300, 225, 300]], 850.0),
    # The same with a cheap fourth column: row 1 takes it (2) instead of column 0.
    ("scipy_wide", [[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]], 452.0),
    # 10 + 1 + 7: row 1's 1 forces rows 0 and 2 onto columns 0 and 1 (10 + 7 beats 9 + 10).
    ("scipy_3x3", [[10, 10, 8], [9, 8, 1], [9, 7, 4]], 18.0),
    # The same rows with a fourth column: row 1 takes column 3 (1), row 2 column 2 (4), row 0 column 0.
    ("scipy_3x4", [[10, 10, 8, 11], [9, 8, 1, 1], [9, 7, 4, 10]], 15.0),
    # +inf forbids a pairing: each row has one allowed column, 10 + 1 + 7.
    (
        "scipy_forbidden",
        [[10, np.inf, np.inf], [np.inf, np.inf, 1], [np.inf, 7, np.inf]],
        18.0,
    ),
    # A forbidden entry that leaves a choice: row 0 cannot take column 0; of the four allowed
    # assignments (2 + 3, 2 + 4, 5 + 3, 5 + 9) rows 0 -> 1, 1 -> 0 is the cheapest.
    ("forbidden_choice", [[np.inf, 2.0, 5.0], [3.0, 9.0, 4.0]], 5.0),
    # Empty problems have total 0.
    ("empty_0x0", np.zeros((0, 0)), 0.0),
    ("empty_2x0", np.zeros((2, 0)), 0.0),
    ("empty_0x3", np.zeros((0, 3)), 0.0),
]
"""``(name, cost, min_total)`` for every exact solver of :func:`saematch_core.lap.linear_sum_assignment`
and the brute force."""
