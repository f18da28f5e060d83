"""The interchange (IIA) audit on models whose answer is known (a hand-built mechanism), its
controls and strict (SIIT) figures, and its determinism and sharding on a tiny transformer."""

import pytest
import torch

from faithful_train.audits.interchange import InterchangeAudit
from faithful_train.errors import UnknownNameError
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer
from tests.unit.equality_cases import ALIGN, PlantedEquality


def test_audit_on_planted_mechanism():
    task = HierarchicalEquality()
    model = PlantedEquality(task)
    true_alignment = {"left": {"site": "h", "dims": [0, 1]}, "right": {"site": "h", "dims": [1, 2]}}
    audit = InterchangeAudit(true_alignment, n_examples=400, batch_size=128)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert results["iia"] == 1.0 and results["iia_changed/left"] == 1.0
    decoy = InterchangeAudit({"left": {"site": "h", "dims": [2, 3]}}, n_examples=400)
    decoy.bind(model, task)
    results = decoy.evaluate(model, task)
    assert results["iia_changed/left"] == 0.0  # the decoy never changes the answer
    assert 0.4 < results["iia/left"] < 0.6  # so it is right only when the label does not change


def test_audit_is_deterministic_and_keeps_model_mode():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    audit = InterchangeAudit(ALIGN, n_examples=64)
    audit.bind(model, task)
    model.train()
    first = audit.evaluate(model, task)
    assert model.training
    assert audit.evaluate(model, task) == first
    assert set(first) == set(audit.metric_names(task))


def test_audit_shards_across_ranks_cover_the_set():
    """Rank shards are disjoint and their weighted means give the single-process figure."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    audit = InterchangeAudit(ALIGN, n_examples=50)
    audit.bind(model, task)
    whole = audit.evaluate(model, task)["iia/left"]
    parts = [audit.evaluate(model, task, rank=r, world_size=2)["iia/left"] for r in (0, 1)]
    assert whole == pytest.approx((parts[0] * 25 + parts[1] * 25) / 50)


def test_audit_controls_and_strict_on_planted_mechanism():
    """On the planted model (16 units): the true units give IIA 1, random directions of the same
    size do not; resampling the decoy unit (not aligned, unused) never changes the answer, resampling
    an aligned unit does."""
    task = HierarchicalEquality()
    model = PlantedEquality(task, width=16)
    true_alignment = {"left": {"site": "h", "dims": [0, 1]}, "right": {"site": "h", "dims": [1, 2]}}
    audit = InterchangeAudit(true_alignment, strict=[{"site": "h", "dims": [2, 3]}], n_examples=400, batch_size=128)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert set(results) == set(audit.metric_names(task))
    assert results["iia"] == 1.0
    assert results["control/random_subspace/iia"] < 0.7
    assert results["control/random_model/iia"] == 1.0  # nothing to re-initialise: the mechanism is hard-wired
    assert results["strict_changed"] == 0.0 and results["strict_iia"] == 1.0
    leaky = InterchangeAudit(true_alignment, strict=[{"site": "h", "dims": [0, 1]}], controls=[], n_examples=400)
    leaky.bind(model, task)
    assert leaky.evaluate(model, task)["strict_changed"] > 0.3


def test_random_model_control_is_at_chance_and_leaves_the_model_alone():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    audit = InterchangeAudit(ALIGN, controls=["random_model"], n_examples=512)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert 0.4 < results["control/random_model/iia"] < 0.6  # argmax over TRUE/FALSE: chance, not 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UnknownNameError, match="random_subspace"):
        InterchangeAudit(ALIGN, controls=["shuffled"])
