"""The structure the code keeps, read from its source: models are asked through
``faithful_train.modeling.interface`` (nothing outside ``modeling/`` checks a model's class or
probes its attributes), and plugins stand alone (no objective or audit imports another
objective or audit; each folder's ``base`` is the framework they share)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "faithful_train"
MODEL_CLASSES = ("Transformer", "HFAdapter", "BottleneckModel")
PROBES = [
    (re.compile(r"isinstance\([^)]*\b(" + "|".join(MODEL_CLASSES) + r")\b"), "checks a model's class"),
    (re.compile(r"\btype\((model|self\.model|backbone)\)\s*(is|==|!=|in)\b"), "checks a model's type"),
    (
        re.compile(r"\b(hasattr|getattr)\((model|self\.model|backbone|fresh|ctx\.model)\b"),
        "probes a model's attributes",
    ),
    (re.compile(r"\.hf_model\b"), "reaches into the Hugging Face adapter"),
    (re.compile(r"\._layers\(\)"), "calls a model's private method"),
]


def _library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "modeling" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_code_outside_modeling_checks_a_models_class_or_attributes(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        for pattern, what in PROBES:
            assert not pattern.search(code), f"{path.relative_to(PACKAGE)}:{number} {what}: {line.strip()}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


PLUGINS = sorted(
    p
    for folder in ("objectives", "audits")
    for p in (PACKAGE / folder).glob("*.py")
    if p.name not in ("__init__.py", "base.py")
)


@pytest.mark.parametrize("path", PLUGINS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_objective_or_audit_imports_another(path):
    own = f"faithful_train.{path.parent.name}.{path.stem}"
    for module in _imports(path):
        for folder in ("objectives", "audits"):
            prefix = f"faithful_train.{folder}."
            if module.startswith(prefix) and module != own:
                assert module == f"{prefix}base" and folder == path.parent.name, f"{own} imports {module}"


def test_the_probe_patterns_catch_what_they_are_for():
    samples = [
        "isinstance(model, Transformer)",
        "type(model) is Transformer",
        "hasattr(model, 'forward_from')",
        "model.hf_model.config",
        "model._layers()",
        "getattr(self.model, 'per_token_logits', True)",
    ]
    for sample in samples:
        assert any(pattern.search(sample) for pattern, _ in PROBES), sample


def test_registry_names_come_from_the_classes():
    from faithful_train.registry import AUDITS, OBJECTIVES, TASKS, load_target

    for builtins in (TASKS, OBJECTIVES, AUDITS):
        for name, target in builtins.items():
            assert load_target(target, "x", name, []).name == name
    assert list(TASKS) == [load_target(t, "x", t, []).name for t in TASKS.targets]  # keys read from the classes


def test_plugins_read_what_a_task_provides_instead_of_sampling_it():
    for path in PLUGINS:
        text = path.read_text()
        assert "task.sample(2" not in text and "perturb(task.sample" not in text, path.name


def test_tasks_declare_what_they_provide():
    from faithful_train.tasks.concept_objects import ConceptObjects
    from faithful_train.tasks.decoy_objects import DecoyObjects
    from faithful_train.tasks.domain_mixture import DomainMixture
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
    from tests.conftest import unperturbed_task

    assert HierarchicalEquality().provides == {"perturbations", "aligned_perturbations"}
    assert ConceptObjects().provides == {"perturbations", "aligned_perturbations", "irrelevant", "concepts"}
    assert {"irrelevant", "aligned_perturbations"} <= DecoyObjects().provides
    assert "concepts" in DomainMixture().provides
    assert unperturbed_task().provides == frozenset()
    for task in (ConceptObjects(), DecoyObjects()):  # what they declare, their batches carry
        batch = task.sample(4, 0)
        assert (
            "irrelevant" in batch
            and task.perturb_aligned(batch, __import__("torch").Generator().manual_seed(0)) is not None
        )
