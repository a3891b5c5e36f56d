"""The fidelity benchmark pins the rows that stand for the shipped configs lever by lever, so that a
row keeps meaning what it measured when a config changes. Here: the pins and the configs agree, a
row that is not the shipped recipe is told apart from it, and the rows built on issue 7's recipe
still resolve to the config their runs recorded."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS, ROOT

from koala.config import load_config

PINS = ROOT / "tests" / "pins"


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _shipped(fidelity, config: str):
    """The shipped `config` as the benchmark runs it: its reference settings, seed 0, its rounds."""
    return load_config(CONFIGS / f"{config}.toml", [*fidelity.REFERENCE, "seed=0", f"rounds={fidelity.ROUNDS}"])


@pytest.mark.parametrize("config", ["koala-homogeneous", "koala-heterogeneous"])
def test_the_shipped_row_is_the_shipped_config(fidelity, config: str) -> None:
    row = fidelity.SHIPPED_ROWS[config]
    assert fidelity.ROWS[row].config == config
    assert fidelity.row_config(row, 0) == _shipped(fidelity, config)


def test_the_map_centre_is_not_the_shipped_recipe(fidelity) -> None:
    centre = fidelity.row_config("koala +initial-forward", 0)
    shipped = _shipped(fidelity, "koala-homogeneous")
    assert (centre.models.small, centre.client.epochs) == (["lenet"], 1)
    assert centre != shipped


def test_the_issue_7_rows_still_resolve_to_the_config_their_runs_recorded(fidelity) -> None:
    # a lever the shipped config changes and ISSUE_7_RECIPE does not pin shows up here by its key
    recorded = load_config(PINS / "fidelity-koala-seed0.toml")
    assert fidelity.config_drift(recorded, "koala", 0) == {}
    # and the check names a setting that differs, with both values
    changed = load_config(PINS / "fidelity-koala-seed0.toml", ["rounds=20", "distill.initial-forward-epochs=3"])
    assert fidelity.config_drift(changed, "koala", 0) == {"rounds": (20, 40), "distill.initial-forward-epochs": (3, 0)}
    # a run started with --set is checked with the same extra settings
    assert fidelity.config_drift(changed, "koala", 0, ["rounds=20", "distill.initial-forward-epochs=3"]) == {}


def test_a_row_that_continues_another_differs_from_it_only_in_more_rounds(fidelity) -> None:
    continued = {name: row for name, row in fidelity.ROWS.items() if row.continues}
    assert continued  # the shipped recipe to 40 rounds
    for name, row in continued.items():
        shorter = fidelity.ROWS[row.continues]
        assert row.rounds > shorter.rounds
        assert fidelity.row_config(name, 0) == fidelity.row_config(row.continues, 0).model_copy(update={"rounds": row.rounds})


def test_a_run_is_named_by_its_commits_and_the_instruction_set_each_session_ran_on(fidelity, tmp_path) -> None:
    import json

    # a run started on one processor and resumed on another, and a run from before the field existed
    sessions = [{"commit": "a" * 40, "dirty": False, "cpu-capability": "AVX512"},
                {"commit": "b" * 40, "dirty": True, "cpu-capability": "AVX2"}]
    for name, recorded in (("resumed", sessions), ("older", [{"commit": "c" * 40, "dirty": False}])):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "eval": {"large": {"accuracy": 0.5}}}) + "\n")
        (run / "summary.json").write_text("{}")
        (run / "environment.json").write_text(json.dumps({"sessions": recorded}))
    assert fidelity.RunRead.load(tmp_path / "resumed").commit == "aaaaaaa (AVX512)→bbbbbbb+dirty (AVX2)"
    assert fidelity.RunRead.load(tmp_path / "older").commit == "ccccccc"


def test_the_tables_show_the_averaged_teacher_where_the_runs_evaluated_it(fidelity, tmp_path) -> None:
    import json

    def run(row: str, seed: int, small: float, averaged: float | None):
        path = fidelity.run_dir(tmp_path, row, seed)
        path.mkdir()
        last = {"large": {"accuracy": 0.6}, "small:lenet": {"accuracy": small}}
        last |= {"averaged:lenet": {"accuracy": averaged}} if averaged is not None else {}
        lines = [{"round": 0, "eval": {"large": {"accuracy": 0.5}, "small:lenet": {"accuracy": 0.4}}}, {"round": 1, "eval": last}]
        (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        (path / "summary.json").write_text("{}")
        return fidelity.RunRead.load(path)

    new, newer, older = run("koala", 0, 0.88, 0.86), run("koala", 1, 0.90, 0.84), run("label-free", 0, 0.86, None)
    assert fidelity.small_cell([new, newer], "test", 1) == "lenet 89.00 ± 1.00 (averaged 85.00 ± 1.00)"
    assert fidelity.small_cell([new, older], "test", 1) == "lenet 87.00 ± 1.00"  # not every run has it
    # by round: the rounds that evaluated the model; a row that never did has no curve (and draws none)
    by_round = fidelity.by_round_table(["koala", "label-free"], [0, 1], tmp_path, "test", 1, ["large", "averaged:lenet"])
    assert by_round.splitlines()[0] == "| round | koala (large) | koala (averaged:lenet) | label-free (large) |"
    assert by_round.splitlines()[2:] == ["| 0 | 50.00 | – | 50.00 |", "| 1 | 60.00 | 85.00 (84.00–86.00) | 60.00 |"]
    with pytest.raises(SystemExit, match=r"no run of \['label-free'\].*evaluated \['averaged:lenet'\]"):
        fidelity.by_round(["label-free"], [0], tmp_path, "test", 1, tmp_path / "plot.png", ["averaged:lenet"])


def test_runs_are_refused_when_the_script_would_run_another_checkouts_package(fidelity, tmp_path) -> None:
    import shutil
    import subprocess

    from koala.run.provenance import PACKAGE_DIR

    assert fidelity.foreign_package(ROOT, PACKAGE_DIR) is None
    # the script copied into a checkout of its own (a worktree) still imports this checkout's package
    (tmp_path / "benchmarks").mkdir()
    script = shutil.copy(ROOT / "benchmarks" / "fidelity.py", tmp_path / "benchmarks")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, script, "run", "--rows", "koala", "--seeds", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"imports koala from {PACKAGE_DIR}" in done.stderr and f"PYTHONPATH={tmp_path / 'src'}" in done.stderr
    assert not out.exists()


def test_a_checkout_of_its_own_with_its_src_on_the_path_runs_and_records_its_own_commit(tmp_path) -> None:
    import json
    import subprocess

    def git(*args: str, cwd: Path = ROOT) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                              capture_output=True, text=True, check=True).stdout.strip()

    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("the project is not a git checkout here")
    clone = tmp_path / "clone"
    git("clone", "-q", "--shared", str(ROOT), str(clone))
    git("commit", "-q", "--allow-empty", "-m", "a commit only the clone has", cwd=clone)
    probe = ("import json, fidelity; from koala.run import provenance as p; print(json.dumps("
             "{'foreign': fidelity.foreign_package(fidelity.CHECKOUT, p.PACKAGE_DIR), 'source': p.source_version()}))")
    env = {**os.environ, "PYTHONPATH": f"{clone / 'src'}{os.pathsep}{clone / 'benchmarks'}"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["foreign"] is None
    assert seen["source"] == {"commit": git("rev-parse", "HEAD", cwd=clone), "dirty": False}
    assert seen["source"]["commit"] != git("rev-parse", "HEAD")
