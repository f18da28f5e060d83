"""The interchange objective: its term against counterfactual labels (hand-patched with plain
hooks), the gradient path through base and source, one-variable sampling, the strict (SIIT)
term, and the learned-subspace (DAS) variant: gradients reach the basis, ``update_model: false``
trains only the basis, and the standard basis gives the fixed term."""

import pytest
import torch

from faithful_train.errors import UnknownNameError
from faithful_train.functional.interchange import interchange_loss
from faithful_train.intervene.sites import run_with
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.interchange import InterchangeObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer
from tests.unit.equality_cases import ALIGN, DAS


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
    objective = InterchangeObjective(
        align, strict=[{"site": "blocks.0.resid_post", "positions": [0]}], strict_weight=0.5
    )
    objective.bind(model, task)
    term = objective.term(_ctx(model, task, batch, objective.sites()))
    generator = torch.Generator().manual_seed(0)
    perm, resample = torch.randperm(16, generator=generator), torch.randperm(16, generator=generator)
    source = {k: v[perm] for k, v in batch.items()}
    iit = interchange_loss(
        _hand_patched_answers(model, batch["input_ids"], source["input_ids"], 1),
        task.counterfactual_labels(batch, source, ["left"]),
    )
    strict = interchange_loss(
        _hand_patched_answers(model, batch["input_ids"], batch["input_ids"][resample], 0), batch["labels"]
    )
    torch.testing.assert_close(term, iit + 0.5 * strict)
    torch.testing.assert_close(objective.parts["strict"], strict.detach())


# --- learned subspaces (DAS) ---


def _term(objective, model, task, batch):
    logits, cache = run_with(model, batch["input_ids"], record=objective.sites())
    ctx = StepContext(batch, logits, cache, model, task, 0, torch.Generator().manual_seed(0))
    return objective.term(ctx)


def _grad_norm(params):
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


@pytest.mark.parametrize("resume", [True, False])
def test_learned_subspace_gradient_reaches_basis_and_upstream_layers(resume):
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", resume=resume)
    objective.bind(model, task)
    assert (objective.plan is not None) == resume
    _term(objective, model, task, task.sample(16, 0)).backward()
    assert _grad_norm(objective.module().parameters()) > 0
    assert _grad_norm(model.blocks[0].parameters()) > 0  # upstream of the patched site
    assert _grad_norm(model.tok_emb.parameters()) > 0
    assert _grad_norm(model.blocks[1].parameters()) > 0


def test_update_model_false_trains_only_the_basis():
    """A DAS search beside training: the term's gradient reaches the basis, never the model."""
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    objective = InterchangeObjective(DAS, subspace="learned", update_model=False)
    objective.bind(model, task)
    _term(objective, model, task, task.sample(16, 0)).backward()
    assert _grad_norm(objective.module().parameters()) > 0
    assert _grad_norm(model.parameters()) == 0


def test_learned_and_fixed_terms_agree_when_the_basis_is_the_standard_one():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    batch = task.sample(16, 0)
    learned = InterchangeObjective(DAS, subspace="learned")
    learned.bind(model, task)
    with torch.no_grad():  # basis = the first 8 standard directions
        learned.bases.bases[0].map.weight = torch.eye(32)[:8]
    fixed = InterchangeObjective(DAS)
    fixed.bind(model, task)
    torch.testing.assert_close(_term(learned, model, task, batch), _term(fixed, model, task, batch), atol=1e-5, rtol=0)
