"""A book notebook's ``parameters`` cell read as a schema, and the check of overrides against it.

The parameters cell is the one place a notebook's author declares its knobs, one assignment per
name, the comment on its line being the help text::

    layer: int | None = None  # first layer of the pair (None: the middle) [pair]
    n_paths = 6  # randomly sampled live features [>= 1]
    alpha = 0.05  # false-discovery rate of the verdict [> 0, < 1]

**Type.** The annotation when there is one, else the type of the default (``int``, ``float``,
``str`` or ``bool``). A default of ``None`` or a list needs an annotation; the ones understood are
``int``, ``float``, ``str``, ``bool``, ``list[T]`` of those, and any of them ``| None``. An ``int``
is accepted where a ``float`` is expected, a ``bool`` never where a number is, and a tuple where a
list is.

**Range.** The comment may end in a rule in square brackets: comma-separated terms that must all
hold (for a list, for each element; ``None`` always passes):

``layer``
    a layer of the build profile (``0 … n_layers − 1``);
``pair``
    the first layer of a pair of consecutive layers (``0 … n_layers − 2``);
``>= x``, ``> x``, ``<= x``, ``< x``
    a bound, ``x`` a number.

:func:`notebook_parameters` reads the schema (and refuses a cell it cannot read, naming the line);
:func:`check_overrides` validates ``-p NAME VALUE`` overrides before anything runs and says which
notebook gets which.
"""

from __future__ import annotations

import ast
import io
import math
import os
import re
import tokenize
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RULE_TERMS",
    "ParamSpec",
    "check_overrides",
    "notebook_parameters",
    "parameters_cell",
]

RULE_TERMS = ("layer", "pair", ">=", ">", "<=", "<")
"""The terms a range rule is made of (see the module docstring)."""

_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}
_RULE = re.compile(r"\[(?P<rule>[^\[\]]*)\]\s*$")
_BOUND = re.compile(r"^(?P<op>>=|<=|>|<)\s*(?P<x>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: its type, its range rule and its default."""

    name: str
    """The variable the cell assigns."""
    base: str
    """Scalar type: ``"int"``, ``"float"``, ``"str"`` or ``"bool"`` (of the elements, for a list)."""
    is_list: bool
    """True when the value is a list of ``base``."""
    optional: bool
    """True when ``None`` is allowed."""
    rule: tuple[tuple[str, float], ...]
    """Range terms ``(term, bound)``: ``("layer", nan)``, ``("pair", nan)`` or ``(">=", 1.0)``, ..."""
    default: Any
    """The value the cell assigns."""
    help: str
    """The comment on the assignment's line, without the rule."""

    def __post_init__(self) -> None:
        if self.base not in _SCALARS:
            raise ValueError(f"ParamSpec.base: expected one of {list(_SCALARS)}, got {self.base!r}")
        for term, _ in self.rule:
            if term not in RULE_TERMS:
                raise ValueError(f"ParamSpec.rule: expected terms among {list(RULE_TERMS)}, got {term!r}")

    @property
    def type_text(self) -> str:
        """The type as it reads in the cell, e.g. ``list[int] | None``."""
        text = f"list[{self.base}]" if self.is_list else self.base
        return f"{text} | None" if self.optional else text

    def describe(self, layers: Sequence[int]) -> str:
        """What a valid value is, in words, e.g. ``int | None, a layer (0..29)``."""
        parts = [self.type_text]
        for term, x in self.rule:
            if term == "layer":
                parts.append(f"a layer ({_span(layers)})")
            elif term == "pair":
                parts.append(f"the first layer of a consecutive pair ({_span(layers[:-1])})")
            else:
                parts.append(f"{term} {x:g}")
        each = " each" if self.is_list and self.rule else ""
        return parts[0] + (f",{each} " + " and ".join(parts[1:]) if len(parts) > 1 else "")

    def problem(self, value: Any, layers: Sequence[int]) -> str | None:
        """Why ``value`` is not valid (``None`` when it is)."""
        if value is None:
            return None if self.optional else "None"
        if self.is_list:
            if not isinstance(value, (list, tuple)):
                return f"{type(value).__name__} {value!r}"
            items = list(value)
        else:
            items = [value]
        for item in items:
            if not _is_scalar(self.base, item):
                return f"{type(item).__name__} {item!r}" + (f" in {value!r}" if self.is_list else "")
            if not all(_holds(term, x, item, layers) for term, x in self.rule):
                return repr(value)
        return None


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if len(layers) else "none"


def _is_scalar(base: str, v: Any) -> bool:
    if base in ("int", "float") and isinstance(v, bool):
        return False
    if base == "float":
        return isinstance(v, (int, float)) and math.isfinite(v)
    return isinstance(v, _SCALARS[base])


def _holds(term: str, x: float, v: Any, layers: Sequence[int]) -> bool:
    if term == "layer":
        return v in layers
    if term == "pair":
        return v in layers[:-1]
    if not isinstance(v, (int, float)):
        return False
    return {">=": v >= x, ">": v > x, "<=": v <= x, "<": v < x}[term]


def parameters_cell(source: str | os.PathLike[str]) -> str:
    """The source text of the notebook's one cell tagged ``parameters`` (a py:percent file).

    Raises
    ------
    FileNotFoundError
        If ``source`` does not exist.
    ValueError
        If the notebook has no cell tagged ``parameters``, or more than one.
    """
    import jupytext

    src = Path(source)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: notebook source does not exist")
    nb = jupytext.read(src, fmt="py:percent")
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{src}: expected exactly one cell tagged 'parameters', got {len(cells)}")
    return str(cells[0].source)


def _annotation(node: ast.expr, where: str) -> tuple[str, bool, bool]:
    """``(base, is_list, optional)`` of an annotation such as ``list[int] | None``."""
    optional = False
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        nones = [s for s in sides if isinstance(s, ast.Constant) and s.value is None]
        if len(nones) == 1:
            optional = True
            node = next(s for s in sides if s is not nones[0])
    if isinstance(node, ast.Name) and node.id in _SCALARS:
        return node.id, False, optional
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Name)
        and node.value.id == "list"
        and isinstance(node.slice, ast.Name)
        and node.slice.id in _SCALARS
    ):
        return node.slice.id, True, optional
    raise ValueError(
        f"{where}: expected an annotation among int, float, str, bool, list[...] of those, "
        f"optionally '| None'; got {ast.unparse(node)!r}"
    )


def _rule(comment: str, where: str) -> tuple[tuple[tuple[str, float], ...], str]:
    """The range rule at the end of ``comment`` and the comment without it."""
    found = _RULE.search(comment)
    if found is None:
        return (), comment.strip()
    terms: list[tuple[str, float]] = []
    for raw in found["rule"].split(","):
        term = raw.strip()
        bound = _BOUND.match(term)
        if term in ("layer", "pair"):
            terms.append((term, math.nan))
        elif bound is not None:
            terms.append((bound["op"], float(bound["x"])))
        else:
            raise ValueError(
                f"{where}: the comment ends in [{found['rule']}], read as a range rule; expected "
                f"comma-separated terms among layer, pair, >= x, > x, <= x, < x; got {term!r}"
            )
    return tuple(terms), comment[: found.start()].strip()


def notebook_parameters(source: str | os.PathLike[str]) -> dict[str, ParamSpec]:
    """The schema of a notebook's parameters cell: name → :class:`ParamSpec`, in cell order.

    Raises
    ------
    ValueError
        If the cell holds anything but one-name assignments of literals, a default of ``None`` or a
        list lacks its annotation, an annotation or a rule is not understood, or a default breaks
        its own type or rule; the message names the notebook and the line.
    """
    src = Path(source)
    text = parameters_cell(src)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string[1:]
    specs: dict[str, ParamSpec] = {}
    for stmt in ast.parse(text).body:
        where = f"{src.name}: parameters cell, line {stmt.lineno}"
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
            name, value, annotation = stmt.target.id, stmt.value, stmt.annotation
        elif (
            isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
        ):
            name, value, annotation = stmt.targets[0].id, stmt.value, None
        else:
            raise ValueError(f"{where}: expected 'name = literal' or 'name: type = literal'")
        try:
            default = ast.literal_eval(value)
        except ValueError:
            raise ValueError(f"{where}: {name}'s default is not a literal: {ast.unparse(value)!r}") from None
        if annotation is not None:
            base, is_list, optional = _annotation(annotation, where)
        elif type(default).__name__ in _SCALARS:
            base, is_list, optional = type(default).__name__, False, False
        else:
            raise ValueError(
                f"{where}: {name} = {default!r} needs a type annotation (e.g. '{name}: int | None = ...')"
            )
        rule, help_text = _rule(comments.get(stmt.end_lineno or stmt.lineno, ""), where)
        spec = ParamSpec(
            name=name,
            base=base,
            is_list=is_list,
            optional=optional,
            rule=rule,
            default=default,
            help=help_text,
        )
        if spec.problem(default, range(10**9)) is not None:
            raise ValueError(
                f"{where}: {name}'s default {default!r} breaks its own type ({spec.type_text}) or rule"
            )
        specs[name] = spec
    return specs


def check_overrides(
    overrides: Mapping[str, Any],
    schemas: Mapping[str, Mapping[str, ParamSpec]],
    layers: Sequence[int],
    *,
    fixed: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Validate ``overrides`` against the target notebooks; return notebook → the overrides it gets.

    Parameters
    ----------
    overrides : name → value, as given with ``-p NAME VALUE``.
    schemas : notebook stem → its :func:`notebook_parameters`, for every notebook the overrides
        target.
    layers : the build profile's layers, for the ``layer`` and ``pair`` rules.
    fixed : names the pipeline sets itself; not offered as alternatives in the unknown-name error.

    Raises
    ------
    ValueError
        One line naming the parameter, the notebook and expected vs got: a name no target declares,
        a value of the wrong type, or one outside its range.
    """
    applied: dict[str, dict[str, Any]] = {stem: {} for stem in schemas}
    for name, value in overrides.items():
        owners = [stem for stem, schema in schemas.items() if name in schema]
        if not owners:
            known = sorted({n for schema in schemas.values() for n in schema} - fixed)
            raise ValueError(
                f"-p {name}: not a parameter of {', '.join(schemas) or 'any notebook'}; "
                f"expected one of {known}"
            )
        for stem in owners:
            spec = schemas[stem][name]
            got = spec.problem(value, layers)
            if got is not None:
                raise ValueError(f"-p {name}: {stem} expects {spec.describe(layers)}; got {got}")
            applied[stem][name] = value
    return applied
