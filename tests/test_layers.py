"""The package reads top-down (docs/architecture.md): a module imports only from its own layer or
the layers below it, never above; objectives and audits import no other objective or audit (only
their base); and no import cycle. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "faithful_train"
# bottom to top; modules at the package root other than these are not allowed
LAYERS = [
    ("errors", "registry", "io"),
    ("tasks",),
    ("modeling",),
    ("intervene",),
    ("functional",),
    ("objectives", "audits"),
    ("training",),
    ("commands",),
]
ROOT_MODULES = {"__init__", "errors", "registry"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("faithful_train"):
            found.add(node.module)
            for alias in node.names:  # `from faithful_train.x import module`
                candidate = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("faithful_train.")}
    return found


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_only_the_facade_errors_and_the_registry_sit_at_the_root():
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ROOT_MODULES


@pytest.mark.parametrize("module", [m for m in MODULES if m != "faithful_train"])
def test_no_module_imports_a_layer_above_it(module: str):
    mine = _layer(module)
    for target in GRAPH[module]:
        if target == "faithful_train":
            continue
        assert _layer(target) <= mine, f"{module} (layer {mine}) imports {target} (layer {_layer(target)})"


def test_objectives_and_audits_import_no_other_objective_or_audit():
    for module, targets in GRAPH.items():
        for kind in ("objectives", "audits"):
            if module.startswith(f"faithful_train.{kind}."):
                others = [
                    t
                    for t in targets
                    if t.startswith(("faithful_train.objectives.", "faithful_train.audits."))
                    and t not in (f"faithful_train.{kind}.base", "faithful_train.objectives.base")
                ]
                assert not others, f"{module} imports {others}"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in GRAPH[module]:
            if state.get(target) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join([*path[path.index(target) :], target]) if target in path else target
                )
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
