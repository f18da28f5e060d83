import pytest
import torch

from faithful_train.errors import UnknownNameError
from faithful_train.tasks.base import take
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality


def test_generation_is_seeded_and_consistent():
    task = HierarchicalEquality(n_symbols=8)
    a, b = task.sample(256, seed=3), task.sample(256, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], task.sample(256, seed=4)["input_ids"])
    w, x, y, z = a["input_ids"].unbind(1)
    assert torch.equal(a["var/left"], (w == x).long()) and torch.equal(a["var/right"], (y == z).long())
    expected = torch.where((w == x) == (y == z), task.true_token, task.false_token)
    assert torch.equal(a["labels"], expected)
    assert a["input_ids"].max() < task.n_symbols and task.vocab_size == 10


def test_balanced_variables_and_labels():
    batch = HierarchicalEquality().sample(4000, seed=0)
    for key in ("var/left", "var/right"):
        assert 0.45 < batch[key].float().mean() < 0.55
    assert 0.45 < (batch["labels"] == HierarchicalEquality().true_token).float().mean() < 0.55


def test_generation_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    HierarchicalEquality().sample(10, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_counterfactual_labels_follow_the_causal_model():
    task = HierarchicalEquality()
    base, source = task.sample(500, 0), task.sample(500, 1)
    cf = task.counterfactual_labels(base, source, ["left"])
    expected = torch.where(source["var/left"] == base["var/right"], task.true_token, task.false_token)
    assert torch.equal(cf, expected)
    both = task.counterfactual_labels(base, source, ["left", "right"])
    assert torch.equal(both, source["labels"])
    assert torch.equal(task.counterfactual_labels(base, source, []), base["labels"])
    with pytest.raises(UnknownNameError, match="valid: left, right"):
        task.counterfactual_labels(base, source, ["middle"])


def test_take_rows():
    batch = HierarchicalEquality().sample(10, 0)
    part = take(batch, torch.tensor([2, 5]))
    assert part["input_ids"].shape == (2, 4) and torch.equal(part["labels"], batch["labels"][[2, 5]])
