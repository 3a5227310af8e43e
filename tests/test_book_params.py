"""The parameters cell as a schema: types and ranges read from the cell, overrides checked against it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from _bookbuild import REPO

from saematch_core._book import discover_notebooks, main
from saematch_core._book_params import ParamSpec, check_overrides, notebook_parameters

_HEADER = (
    "# ---\n# jupyter:\n"
    '#   jupytext: {formats: "py:percent"}\n'
    "#   kernelspec: {name: python3, display_name: Python 3, language: python}\n"
    "# ---\n"
)
_CELL = """profile = "smoke"  # build profile
layer: int | None = None  # first layer of a pair [pair]
start: int = 0  # any layer [layer]
starts: list[int] | None = None  # start layers, e.g. [1, 2] [layer, >= 1]
n_paths = 6  # features followed [>= 1]
alpha = 0.05  # a rate [> 0, < 1]
quantiles: list[float] = [0.0, 0.5]  # quantiles [>= 0, <= 1]
flag = False  # a switch
note = "x"  # free text, with [brackets] inside
"""


def _notebook(path: Path, cell: str) -> Path:
    path.write_text(
        f'{_HEADER}\n# %% [markdown]\n# # Title\n\n# %% tags=["parameters"]\n{cell}\n# %%\nx = 1\n'
    )
    return path


def test_schema_reads_types_rules_defaults_and_help(tmp_path: Path) -> None:
    specs = notebook_parameters(_notebook(tmp_path / "01_a.py", _CELL))
    assert list(specs) == [
        "profile",
        "layer",
        "start",
        "starts",
        "n_paths",
        "alpha",
        "quantiles",
        "flag",
        "note",
    ]
    assert specs["layer"].type_text == "int | None" and specs["layer"].rule[0][0] == "pair"
    assert specs["starts"].type_text == "list[int] | None"
    assert [t for t, _ in specs["starts"].rule] == ["layer", ">="]
    assert specs["starts"].help == "start layers, e.g. [1, 2]"
    assert specs["n_paths"].rule == ((">=", 1.0),) and specs["n_paths"].default == 6
    assert specs["alpha"].base == "float" and specs["quantiles"].type_text == "list[float]"
    assert specs["flag"].base == "bool" and specs["note"].rule == ()
    assert specs["note"].help == "free text, with [brackets] inside"


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (
            "layer = None  # no type",
            r"01_a\.py: parameters cell, line 1: layer = None needs a type annotation",
        ),
        ("xs = [1]  # no type", r"line 1: xs = \[1\] needs a type annotation"),
        ("n: dict = 1", r"line 1: expected an annotation among int, float.*got 'dict'"),
        ("a = b = 1", r"line 1: expected 'name = literal'"),
        ("a = len('x')", r"line 1: a's default is not a literal"),
        ("n = 1  # count [>= one]", r"line 1: the comment ends in \[>= one\].*got '>= one'"),
        ("n = 0  # count [>= 1]", r"line 1: n's default 0 breaks its own type \(int\) or rule"),
    ],
)
def test_schema_refuses_a_cell_it_cannot_read(tmp_path: Path, cell: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        notebook_parameters(_notebook(tmp_path / "01_a.py", cell))


def test_every_repository_notebook_has_a_readable_schema() -> None:
    for src in discover_notebooks(REPO / "notebooks"):
        specs = notebook_parameters(src)
        assert "profile" in specs, src.name
        for spec in specs.values():
            assert spec.problem(spec.default, range(100)) is None, (src.name, spec.name)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (
            "layer",
            "abc",
            r"-p layer: 01_a expects int \| None, the first layer of a consecutive pair "
            r"\(0\.\.2\); got str 'abc'",
        ),
        ("layer", 1.5, r"-p layer: 01_a expects int \| None, .*; got float 1\.5"),
        ("layer", True, r"got bool True"),
        ("layer", 3, r"-p layer: 01_a expects .*\(0\.\.2\); got 3"),
        ("layer", -1, r"got -1"),
        ("start", 4, r"-p start: 01_a expects int, a layer \(0\.\.3\); got 4"),
        ("start", None, r"-p start: 01_a expects int, a layer .*; got None"),
        (
            "starts",
            [1, 9],
            r"-p starts: 01_a expects list\[int\] \| None, each a layer \(0\.\.3\) and >= 1; "
            r"got \[1, 9\]",
        ),
        ("starts", [0], r"got \[0\]"),
        ("starts", 2, r"got int 2"),
        ("starts", [1, "2"], r"got str '2' in \[1, '2'\]"),
        ("n_paths", -3, r"-p n_paths: 01_a expects int, >= 1; got -3"),
        ("n_paths", 0, r"got 0"),
        ("alpha", 1, r"-p alpha: 01_a expects float, > 0 and < 1; got 1"),
        ("alpha", float("inf"), r"got float inf"),
        ("quantiles", [0.5, 1.5], r"got \[0\.5, 1\.5\]"),
        ("flag", 1, r"-p flag: 01_a expects bool; got int 1"),
        ("note", 3, r"got int 3"),
    ],
)
def test_bad_overrides_name_parameter_notebook_expected_and_got(
    tmp_path: Path, name: str, value: object, problem: str
) -> None:
    schema = notebook_parameters(_notebook(tmp_path / "01_a.py", _CELL))
    with pytest.raises(ValueError, match=problem):
        check_overrides({name: value}, {"01_a": schema}, range(4))


def test_good_overrides_go_to_the_notebooks_that_declare_them(tmp_path: Path) -> None:
    schema = notebook_parameters(_notebook(tmp_path / "01_a.py", _CELL))
    other = notebook_parameters(_notebook(tmp_path / "02_b.py", 'profile = "smoke"\nn_paths = 2  # [>= 1]'))
    got = check_overrides(
        {"layer": 2, "starts": (1, 3), "n_paths": 1, "alpha": 0.5, "quantiles": [0, 1.0], "flag": True},
        {"01_a": schema, "02_b": other},
        range(4),
    )
    assert got["02_b"] == {"n_paths": 1}
    assert got["01_a"] == {
        "layer": 2,
        "starts": (1, 3),
        "n_paths": 1,
        "alpha": 0.5,
        "quantiles": [0, 1.0],
        "flag": True,
    }
    assert check_overrides({"layer": None}, {"01_a": schema}, range(4)) == {"01_a": {"layer": None}}


def test_unknown_override_names_the_notebooks_and_their_parameters(tmp_path: Path) -> None:
    schema = notebook_parameters(
        _notebook(tmp_path / "01_a.py", 'profile = "smoke"\nseed = 0\nout_dir = "x"')
    )
    with pytest.raises(ValueError, match=r"^-p layr: not a parameter of 01_a; expected one of \['seed'\]$"):
        check_overrides({"layr": 1}, {"01_a": schema}, range(4), fixed=frozenset({"profile", "out_dir"}))


def test_param_spec_checks_its_fields() -> None:
    with pytest.raises(ValueError, match=r"ParamSpec\.base: expected one of"):
        ParamSpec(name="x", base="dict", is_list=False, optional=False, rule=(), default=1, help="")
    with pytest.raises(ValueError, match=r"ParamSpec\.rule"):
        ParamSpec(
            name="x", base="int", is_list=False, optional=False, rule=(("~", math.nan),), default=1, help=""
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--only", "09", "-p", "layer", "abc"],
            "-p layer: 09_explorer expects int | None, a layer (0..3); got str 'abc'",
        ),
        (["--only", "03", "-p", "layer", "1.5"], "-p layer: 03_feature_matching expects int | None"),
        (["--only", "03", "-p", "layer", "99"], "; got 99"),
        (["--only", "09", "-p", "n_paths", "-3"], "-p n_paths: 09_explorer expects int, >= 1; got -3"),
        (["--only", "09", "-p", "layr", "3"], "-p layr: not a parameter of 09_explorer; expected one of"),
        (["--only", "02", "-p", "layer", "1"], "-p layer: not a parameter of 02_folding_vs_cosine"),
    ],
)
def test_book_command_refuses_bad_overrides_in_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    build = tmp_path / "build"
    assert main(["--root", str(REPO), "--build-dir", str(build), "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not build.exists()
