"""Interchange: pure functions, the objective's term and gradient path, and the IIA audit on
models whose answer is known (a hand-built mechanism)."""

import pytest
import torch
from torch import nn

from faithful_train.audits.interchange import InterchangeAudit
from faithful_train.batches import gather_positions
from faithful_train.causal import interchange_hits, interchange_loss, parse_alignment
from faithful_train.errors import UnknownNameError
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.interchange import InterchangeObjective
from faithful_train.sites import HookPoint, SitePoint, run_with
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer

ALIGN = {"left": {"site": "blocks.0.resid_post", "positions": [1]}, "right": {"site": "blocks.0.resid_post", "positions": [3]}}


class PlantedEquality(nn.Module):
    """Computes the task by hand: ``left`` lives in unit 0 of site ``h``, ``right`` in unit 1,
    ``decoy`` (unit 2) holds a copy of ``left`` that the output ignores. Logits put +10 on the
    right answer token. IIA for left/right at their units is exactly 1; at the decoy, chance."""

    def __init__(self, task: HierarchicalEquality, width: int = 3):
        super().__init__()
        self.task, self.width = task, width
        self.hook_h = HookPoint()
        self.dummy = nn.Parameter(torch.zeros(1))

    def site_points(self):
        return {"h": SitePoint(self.hook_h)}

    def forward(self, ids, attention_mask=None, positions=None, narrow=True):
        w, x, y, z = ids.unbind(1)
        left, right = (w == x).float(), (y == z).float()
        units = [left, right, left] + [torch.zeros_like(left)] * (self.width - 3)
        h = self.hook_h(torch.stack(units, dim=-1)[:, None].repeat(1, 4, 1))  # (B, 4, width)
        same = 1 - (h[:, -1, 0] - h[:, -1, 1]).abs()
        return self.answer(ids, same, positions)

    def answer(self, ids, same, positions):
        """+10 on the true token where ``same`` is 1, on the false token where it is 0."""
        logits = torch.zeros(ids.shape[0], 4, self.task.vocab_size) + self.dummy
        logits[:, -1, self.task.true_token] = 10 * same
        logits[:, -1, self.task.false_token] = 10 * (1 - same)
        return logits if positions is None else gather_positions(logits, positions)


def test_pure_loss_and_hits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0])
    assert torch.equal(interchange_hits(logits, labels), torch.tensor([1.0, 0.0]))
    expected = -(torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(logits, -1)[1, 0]) / 2
    torch.testing.assert_close(interchange_loss(logits, labels), expected)


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


def test_alignment_errors_name_valid_values():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    with pytest.raises(UnknownNameError, match="variable"):
        parse_alignment({"middle": "blocks.0.resid_post"}, model, task)
    with pytest.raises(UnknownNameError, match="blocks.0.resid_post"):
        parse_alignment({"left": "blocks.0.resid_psot"}, model, task)


def _ctx(model, task, batch, sites):
    logits, cache = run_with(model, batch["input_ids"], record=sites)
    return StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(0))


def _hand_patched_answers(model, base_ids, source_ids, position):
    """Last-position logits of ``base`` with blocks.0.resid_post at ``position`` taken from
    ``source``, written with a plain forward hook (independent of our sites machinery)."""
    stored = {}
    hook = model.blocks[0].register_forward_hook(lambda m, a, out: stored.setdefault("src", out))
    model(source_ids)
    hook.remove()

    def swap(m, a, out):
        out = out.clone()
        out[:, position] = stored["src"][:, position]
        return out

    hook = model.blocks[0].register_forward_hook(swap)
    logits = model(base_ids)[:, -1]
    hook.remove()
    return logits


@pytest.mark.parametrize("bound", [False, True])  # bound: the patched run resumes at block 1
def test_objective_term_is_ce_against_counterfactual_labels(bound):
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(32, 0)
    objective = InterchangeObjective(ALIGN)
    if bound:
        objective.bind(model, task)
        assert objective.plan.layer == 1 and "blocks.1.resid_pre" in objective.sites()
    term = objective.term(_ctx(model, task, batch, objective.sites()))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    source = {k: v[perm] for k, v in batch.items()}
    expected = []
    for var, position in (("left", 1), ("right", 3)):
        answers = _hand_patched_answers(model, batch["input_ids"], source["input_ids"], position)
        expected.append(interchange_loss(answers, task.counterfactual_labels(batch, source, [var])))
    torch.testing.assert_close(term, (expected[0] + expected[1]) / 2)


def test_gradient_reaches_upstream_parameters_and_detached_source_blocks_it():
    """The term's gradient reaches parameters upstream of the patched site (block 0) through
    the base run; detaching the source removes the path through the source activations."""
    task = HierarchicalEquality()
    batch = task.sample(16, 0)
    align = {"left": {"site": "blocks.0.resid_post", "positions": [1]}}
    grads = {}
    for detach in (False, True):
        model = tiny_transformer(vocab_size=task.vocab_size)
        objective = InterchangeObjective(align, detach_source=detach)
        objective.term(_ctx(model, task, batch, objective.sites())).backward()
        grads[detach] = model.blocks[0].attn.qkv.weight.grad.clone()
        assert grads[detach].abs().sum() > 0  # upstream of the site: via the unpatched positions
    assert not torch.allclose(grads[False], grads[True])

    # with the whole site patched, the base run contributes nothing below the site
    full = {"left": {"site": "blocks.0.resid_post"}}
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(full, detach_source=True)
    objective.term(_ctx(model, task, batch, objective.sites())).backward()
    assert model.blocks[0].attn.qkv.weight.grad is None or model.blocks[0].attn.qkv.weight.grad.abs().sum() == 0
    assert model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(full, detach_source=False)
    objective.term(_ctx(model, task, batch, objective.sites())).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # only through the source


def test_sample_mode_uses_one_variable():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(ALIGN, variables="sample")
    calls = []
    model.blocks[1].hook_resid_pre.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    objective.term(_ctx(model, task, task.sample(8, 0), objective.sites()))
    assert calls == [8, 8]  # the recorded forward, then one patched forward of B rows (not 2B)
    with pytest.raises(UnknownNameError):
        InterchangeObjective(ALIGN, variables="some")


def test_strict_term_is_ce_of_resampled_non_aligned_sites_against_base_labels():
    """SIIT: term = IIT + strict_weight * CE(M(b | non-aligned <- resample), base label)."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(16, 0)
    align = {"left": {"site": "blocks.0.resid_post", "positions": [1]}}
    objective = InterchangeObjective(align, strict=[{"site": "blocks.0.resid_post", "positions": [0]}], strict_weight=0.5)
    objective.bind(model, task)
    term = objective.term(_ctx(model, task, batch, objective.sites()))
    generator = torch.Generator().manual_seed(0)
    perm, resample = torch.randperm(16, generator=generator), torch.randperm(16, generator=generator)
    source = {k: v[perm] for k, v in batch.items()}
    iit = interchange_loss(
        _hand_patched_answers(model, batch["input_ids"], source["input_ids"], 1),
        task.counterfactual_labels(batch, source, ["left"]),
    )
    strict = interchange_loss(_hand_patched_answers(model, batch["input_ids"], batch["input_ids"][resample], 0), batch["labels"])
    torch.testing.assert_close(term, iit + 0.5 * strict)
    torch.testing.assert_close(objective.parts["strict"], strict.detach())


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
