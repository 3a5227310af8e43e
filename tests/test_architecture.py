"""The import rules of docs/ARCHITECTURE.md hold for every module of the package and every notebook.

The rules are read from the table in the document itself (between the ``import-rules`` markers),
so the page a newcomer reads and the rule the code obeys cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saematch_core"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PKG = "saematch_core"

Rules = tuple[dict[str, str], dict[str, set[str]]]
"""(module or ``prefix.*`` pattern → layer, layer → layers it may import)."""


def read_rules(text: str) -> Rules:
    """The layer table of the architecture page."""
    m = re.search(r"<!-- import-rules[^>]*-->\n(.*?)<!-- /import-rules -->", text, re.S)
    if m is None:
        raise ValueError(f"{DOC}: no import-rules table")
    where: dict[str, str] = {}
    allowed: dict[str, set[str]] = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        layer = cells[0].strip("`")
        for name in re.findall(r"`([^`]+)`", cells[1]):
            if name in where:
                raise ValueError(f"{DOC}: module {name!r} is in two layers")
            where[name] = layer
        allowed[layer] = set(re.findall(r"`([^`]+)`", cells[2]))
    unknown = {x for ls in allowed.values() for x in ls} - set(allowed)
    if unknown:
        raise ValueError(f"{DOC}: 'may import' names unknown layers {sorted(unknown)}")
    return where, allowed


def layer_of(module: str, where: Mapping[str, str]) -> str | None:
    """The layer of ``module`` (relative to the package, ``__init__`` for the package itself)."""
    if module in where:
        return where[module]
    parts = module.split(".")
    for i in range(len(parts) - 1, 0, -1):
        pattern = ".".join(parts[:i]) + ".*"
        if pattern in where:
            return where[pattern]
    return None


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name relative to it (packages by their own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        out[".".join(parts)] = path
    return out


def _target(node_module: str, names: list[str], modules: Mapping[str, Path]) -> Iterator[str]:
    """The package modules an ``import`` / ``from ... import`` statement loads (relative names)."""
    rel = node_module[len(PKG) + 1 :] if node_module != PKG else "__init__"
    if not names:
        yield rel
        return
    for name in names:
        sub = name if rel == "__init__" else f"{rel}.{name}"
        yield sub if sub in modules else rel


def imports_of(source: str, module: str, modules: Mapping[str, Path]) -> Iterator[tuple[int, str, str]]:
    """``(line, imported package module, text)`` of every saematch_core import in ``source``,
    including imports inside functions; relative imports are resolved against ``module``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    yield from ((node.lineno, t, alias.name) for t in _target(alias.name, [], modules))
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = module.split(".")[: -node.level] if module != "__init__" else []
                name = ".".join([PKG, *base, *([name] if name else [])])
            if name == PKG or name.startswith(PKG + "."):
                names = [a.name for a in node.names]
                if name == PKG and names == ["__version__"]:
                    continue  # everyone may read the version
                yield from (
                    (node.lineno, t, f"from {name} import ...") for t in _target(name, names, modules)
                )


def violations(module: str, source: str, rules: Rules, modules: Mapping[str, Path]) -> list[str]:
    """What ``module``'s imports break (empty when it follows the rules)."""
    where, allowed = rules
    mine = layer_of(module, where)
    if mine is None:
        return [f"{module}: not in any layer of {DOC.name}; add it to the import-rules table"]
    out = []
    for line, target, text in imports_of(source, module, modules):
        theirs = layer_of(target, where)
        if theirs is None:
            out.append(f"{module}:{line}: imports {target}, which is in no layer")
        elif theirs not in allowed[mine]:
            out.append(f"{module}:{line}: layer {mine} may not import {target} (layer {theirs}): {text}")
    return out


def third_party_violations(module: str, source: str, layer: str) -> list[str]:
    """plotly only in faces, transformers only in the substrate."""
    out = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top == "plotly" and layer != "faces":
                out.append(f"{module}:{node.lineno}: plotly outside the faces")
            if top == "transformers" and layer != "substrate":
                out.append(f"{module}:{node.lineno}: transformers outside the substrate")
    return out


RULES = read_rules(DOC.read_text(encoding="utf-8"))
MODULES = package_modules()


def test_every_module_follows_the_import_rules() -> None:
    where, _ = RULES
    problems = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        problems += violations(module, source, RULES, MODULES)
        layer = layer_of(module, where)
        if layer is not None:
            problems += third_party_violations(module, source, layer)
    assert not problems, "\n".join(problems)


def test_every_layer_of_the_table_holds_a_module() -> None:
    where, allowed = RULES
    used = {layer_of(m, where) for m in MODULES}
    assert set(allowed) <= used, f"layers without modules: {sorted(set(allowed) - used)}"
    listed = {name for name in where if not name.endswith(".*")}
    assert listed <= set(MODULES), f"table names missing modules: {sorted(listed - set(MODULES))}"


def test_experiments_never_import_each_other() -> None:
    _, allowed = RULES
    assert "experiments" not in allowed["experiments"]
    assert "claims" not in allowed["experiments"] and "faces" not in allowed["claims"]


def test_notebooks_import_only_public_modules() -> None:
    problems = []
    for nb in sorted((ROOT / "notebooks").glob("*.py")):
        for line, target, text in imports_of(nb.read_text(encoding="utf-8"), "__notebook__", MODULES):
            if any(part.startswith("_") and part != "__init__" for part in target.split(".")):
                problems.append(f"{nb.name}:{line}: imports the private module {target}: {text}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("experiments.splits", "from saematch_core.experiments.decision import run", "may not import"),
        ("experiments.splits", "from saematch_core.experiments import decision", "may not import"),
        ("match", "def f():\n    from saematch_core.prepare import prepare", "may not import"),
        ("cost", "import saematch_core.plots", "may not import"),
        ("experiments.measures.scores", "from ..decision import run", "may not import"),
        ("experiments.new_thing", "import torch", "not in any layer"),
    ],
)
def test_the_checker_catches_violations(module: str, source: str, expected: str) -> None:
    found = violations(module, source, RULES, MODULES)
    assert found and expected in found[0]


def test_the_checker_accepts_allowed_imports() -> None:
    ok = (
        "from saematch_core.experiments.measures.coactivation import coactivation\nimport saematch_core.match"
    )
    assert violations("experiments.splits", ok, RULES, MODULES) == []
    assert violations("cache", "from saematch_core import __version__", RULES, MODULES) == []
    assert third_party_violations("cost", "import plotly.graph_objects as go", "matching")
