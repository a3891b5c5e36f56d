"""The import rules that keep the layers apart (README, "Architecture"): the entry points (the CLI and
the Flower apps) -> run -> engines -> algorithms -> the maths (training, distillation, aggregation,
accounting, weights) -> models and data. A module may import from its own layer and the layers
below it, never above; only the Flower engine imports flwr."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "koala"
FLOWER_ENTRY_POINTS = {"koala.engine.flower.server_app", "koala.engine.flower.simulation"}
"""Flower calls these by name, so they sit with the Flower code; they join the run layer and the
Flower engine, as the CLI joins the run layer and the local engine."""
MATHS = ["koala.training", "koala.vectorised", "koala.distill", "koala.aggregate", "koala.augment", "koala.weights",
         "koala.accounting", "koala.state", "koala.sampling", "koala.seeding", "koala.config", "koala.device",
         "koala.privacy", "koala.dp_sgd"]
ABOVE_ALGORITHMS = ["koala.algorithms", "koala.engine", "koala.run", "koala.cli", "koala.report"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


MODULES = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _within(module: str, packages: list[str] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _offenders(importers: list[str], forbidden: list[str], exact: bool = False) -> dict[str, list[str]]:
    """The modules of `importers` (packages, or exactly these modules) that import any of `forbidden`."""
    offenders = {}
    for module, imported in MODULES.items():
        if (module in importers) if exact else _within(module, importers):
            bad = sorted(name for name in imported if _within(name, forbidden))
            if bad:
                offenders[module] = bad
    return offenders


def test_the_package_is_what_the_rules_describe() -> None:
    assert {"koala.run.loop", "koala.engine.local", "koala.engine.flower.grid", "koala.algorithms.koala",
            "koala.state", "koala.weights"} <= set(MODULES)


def test_only_the_flower_engine_imports_flwr() -> None:
    users = {module for module, imported in MODULES.items() if any(_within(name, ["flwr"]) for name in imported)}
    assert users and all(module.startswith("koala.engine.flower") for module in users)


def test_the_shared_state_types_import_nothing_of_koala() -> None:
    assert not [name for name in MODULES["koala.state"] if name.startswith("koala")]


@pytest.mark.parametrize("layer, forbidden", [
    (["koala.algorithms"], ["koala.engine", "koala.run", "koala.cli", "koala.report"]),
    (MATHS, ABOVE_ALGORITHMS),
    (["koala.models", "koala.data"], [*ABOVE_ALGORITHMS, "koala.training", "koala.distill", "koala.aggregate",
                                      "koala.weights", "koala.accounting"]),
])
def test_lower_layers_import_nothing_above_them(layer: list[str], forbidden: list[str]) -> None:
    assert _offenders(layer, forbidden) == {}


def test_engines_reach_the_run_layer_only_from_flowers_entry_points() -> None:
    engines = [m for m in MODULES if m.startswith("koala.engine") and m not in FLOWER_ENTRY_POINTS]
    assert _offenders(engines, ["koala.run", "koala.cli"], exact=True) == {}
    # the run layer drives the local engine and names the dispatch contract, never Flower
    assert _offenders(["koala.run"], ["koala.engine.flower", "koala.cli", "flwr"]) == {}
