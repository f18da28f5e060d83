"""The concepts audit on hand-set bottleneck models whose answers are known
(tests/unit/planted_concepts.py): an honest one, one whose rule needs a concept it was not
given, and one that leaks that concept through a soft probability."""

from __future__ import annotations

import pytest
import torch

from faithful_train.audits.concepts import ConceptsAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.tasks.concept_objects import ConceptObjects
from tests.conftest import tiny_transformer
from tests.unit.planted_concepts import planted


def audit(task: ConceptObjects, leaky: bool = False, **kwargs) -> dict[str, float]:
    model = planted(task, leaky)
    a = ConceptsAudit(n_examples=1024, batch_size=256, **kwargs)
    a.bind(model, task)
    return a.evaluate(model, task)


def test_honest_bottleneck_scores_perfectly():
    r = audit(ConceptObjects())
    assert r["concept_acc"] == 1.0 and r["task_acc"] == 1.0
    assert all(r[f"tti/{k}"] == 1.0 for k in range(5)) and r["tti_area"] == 1.0
    assert r["leakage/reference"] == 1.0 and abs(r["leakage"]) <= 0.02


def test_occluded_concepts_are_fixed_by_intervention():
    task = ConceptObjects(occlusion=0.2)
    r = audit(task)
    # every occluded attribute reads as all-zero -> value 0: right only when the value is 0
    assert 0.8 < r["concept_acc"] < 0.95
    curve = [r[f"tti/{k}"] for k in range(5)]
    assert curve == sorted(curve) and curve[0] < 0.75 and curve[-1] == 1.0
    assert r["tti_area"] == pytest.approx(sum((a + b) / 2 for a, b in zip(curve, curve[1:])) / 4)
    uncertain = audit(task, order="uncertainty")
    assert uncertain["tti/0"] == curve[0] and uncertain["tti/4"] == 1.0


def test_a_rule_on_an_unlabelled_concept_caps_an_honest_bottleneck():
    r = audit(ConceptObjects(hidden_concept=True))
    assert r["concept_acc"] == 1.0 and 0.4 < r["task_acc"] < 0.6  # pattern is a coin flip to it
    assert 0.4 < r["leakage/reference"] < 0.6 and abs(r["leakage"]) <= 0.05


def test_leak_through_a_soft_probability_is_measured_and_breaks_interventions():
    r = audit(ConceptObjects(hidden_concept=True), leaky=True)
    assert r["concept_acc"] == 1.0 and r["task_acc"] == 1.0  # looks perfect...
    assert r["leakage"] >= 0.3  # ...because pattern leaks through size's confidence
    assert r["tti/4"] < 0.6  # setting the true concepts wipes the leak out


def test_figures_written_and_names_checked(tmp_path):
    task = ConceptObjects(occlusion=0.2)
    model = planted(task)
    a = ConceptsAudit(n_examples=64, thresholds={"tti/4": ">= 0.99"})
    a.bind(model, task)
    assert "tti/4" in a.metric_names(task) and "leakage/side" not in a.metric_names(task)
    a.remember(a.evaluate(model, task), step=7)
    a.write_artifacts(model, task, tmp_path, 7, [])
    lines = (tmp_path / "concepts" / "intervention_step000007.csv").read_text().splitlines()
    assert lines[0] == "concepts_set,fraction,task_acc" and len(lines) == 6 and lines[-1].startswith("4,1.0000,1.0")
    assert (tmp_path / "concepts" / "intervention_step000007.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UnknownNameError, match="metric of audit 'concepts' 'tti/9'"):
        ConceptsAudit(thresholds={"tti/9": 0.5}).bind(model, task)
    with pytest.raises(UnknownNameError, match="intervention order"):
        ConceptsAudit(order="greedy")
    with pytest.raises(ConfigError, match="needs a model with a concept bottleneck"):
        ConceptsAudit().bind(tiny_transformer(task.vocab_size, max_seq_len=task.seq_len), task)


def test_sharded_audit_equals_one_process():
    """Figures summed and probed over two shards (as two DDP ranks would) equal one process's."""
    task = ConceptObjects(occlusion=0.2, hidden_concept=True)
    model = planted(task, leaky=True)
    whole = ConceptsAudit(n_examples=256, batch_size=64)
    whole.bind(model, task)
    expected = whole.evaluate(model, task)
    parts = {}
    a = ConceptsAudit(n_examples=256, batch_size=64)
    a.bind(model, task)
    original = a.summarise

    def merged(totals, task):
        parts.setdefault("calls", []).append({k: v.clone() for k, v in totals.items()})
        if len(parts["calls"]) < 2:
            return original(totals, task)
        summed = {k: parts["calls"][0][k] + parts["calls"][1][k] for k in totals}
        return original(summed, task)

    a.summarise = merged
    a.evaluate(model, task, rank=0, world_size=2)
    shard1 = a.evaluate(model, task, rank=1, world_size=2)
    for key in ("leakage", "leakage/reference"):
        assert shard1[key] == pytest.approx(expected[key], abs=1e-9)
    rows = parts["calls"][0]["rows/label"] + parts["calls"][1]["rows/label"]  # each shard fills its own rows
    assert torch.equal(rows[:, 0].long(), whole.data(task)["labels"])
