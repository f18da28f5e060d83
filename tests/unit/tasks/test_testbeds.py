import pytest
import torch

from faithful_train.errors import UnknownNameError
from faithful_train.tasks.base import take
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.multistep_arithmetic import MultiStepArithmetic


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


def test_hierarchical_equality_perturbations_keep_the_label_and_align_every_token():
    task = HierarchicalEquality(n_symbols=8)
    batch = task.sample(512, 0)
    ids, source = task.perturb_aligned(batch, torch.Generator().manual_seed(1))
    w, x, y, z = ids.unbind(1)
    assert torch.equal(torch.where((w == x) == (y == z), task.true_token, task.false_token), batch["labels"])
    # a consistent renaming: two new tokens are equal exactly when the tokens they stand for are
    original = batch["input_ids"].gather(1, source)
    assert torch.equal(ids[:, :, None] == ids[:, None, :], original[:, :, None] == original[:, None, :])
    assert (source.sort(dim=1).values == torch.arange(4)).all()  # every token aligned once
    assert (ids != original).float().mean() > 0.5  # the symbols do change
    assert len({tuple(r) for r in source.tolist()}) == 8  # 2 x 2 x 2 orders
    again, _ = task.perturb_aligned(batch, torch.Generator().manual_seed(1))
    assert torch.equal(ids, again) and torch.equal(task.perturb(batch, torch.Generator().manual_seed(1)), ids)


@pytest.mark.parametrize("answer_hint", [False, True])
def test_multistep_arithmetic_perturbation_swaps_the_first_operands_and_keeps_the_chain(answer_hint):
    task = MultiStepArithmetic(modulus=7, n_operands=4, answer_hint=answer_hint)
    batch = task.sample(256, 0)
    ids, source = task.perturb_aligned(batch, torch.Generator().manual_seed(0))
    a = task.offset
    assert torch.equal(ids[:, a], batch["input_ids"][:, a + 1]) and torch.equal(ids[:, a + 1], batch["input_ids"][:, a])
    steps = list(task.step_positions)
    assert torch.equal(ids[:, steps], batch["input_ids"][:, steps])
    assert torch.equal(ids[:, steps[0]], (ids[:, a] + ids[:, a + 1]) % 7)  # the chain still reads right
    assert torch.equal(batch["input_ids"].gather(1, source), ids)


def test_domain_mixture_perturbations_align_each_kept_token_to_where_it_was():
    from faithful_train.tasks.domain_mixture import DomainMixture

    task = DomainMixture(n_symbols=8, n_operands=4)
    batch = task.sample(512, 0)
    ids, source = task.perturb_aligned(batch, torch.Generator().manual_seed(3))
    assert torch.equal(ids, task.perturb(batch, torch.Generator().manual_seed(3)))
    aligned = source >= 0
    assert torch.equal(batch["input_ids"].gather(1, source.clamp_min(0))[aligned], ids[aligned])  # the same token
    dropped = (~aligned).sum(1)
    for d, name in enumerate(task.domains):  # copy/reverse keep one operand, sum two, sort all
        expected = {"copy": 3, "reverse": 3, "sum": 2, "sort": 0}[name]
        assert (dropped[batch["concept/domain"] == d] == expected).all(), name
    sort = batch["concept/domain"] == task.domains.index("sort")
    assert (source[sort, 1:5] != torch.arange(1, 5)).any()  # sort's alignment follows the permutation
