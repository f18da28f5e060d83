"""The ``preserve`` objective: KL to the frozen start, per real token; it is zero at the start and
it keeps a model that fine-tunes on answers close to where it started (with it vs. without it)."""

from __future__ import annotations

import torch

from faithful_train.functional.losses import token_kl, token_kl_from_states
from faithful_train.intervene.sites import run_with
from faithful_train.modeling.reference import FrozenCopy
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.preserve import PreserveObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.training.module import task_loss
from tests.conftest import tiny_transformer


def _ctx(model, reference, batch, task, step=0):
    logits, cache = run_with(model, batch["input_ids"], record=["final"], attention_mask=batch.get("attention_mask"))
    return StepContext(batch, logits, cache, model, task, step, torch.Generator().manual_seed(0), reference=reference)


def test_term_is_the_per_token_kl_and_zero_at_the_start():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    reference = FrozenCopy(model)
    batch = task.sample(16, 0)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][:4, :1] = 0  # padding is not counted
    objective = PreserveObjective()
    assert objective.term(_ctx(model, reference, batch, task)).item() < 1e-7
    with torch.no_grad():
        model.unembed.weight.add_(0.5 * torch.randn_like(model.unembed.weight))
    ctx = _ctx(model, reference, batch, task)
    p = ctx.logits.log_softmax(-1)
    q = reference(batch["input_ids"], attention_mask=batch["attention_mask"]).log_softmax(-1)
    per_token = (p.exp() * (p - q)).sum(-1)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(objective.term(ctx), per_token[mask].mean())
    assert not any(p.requires_grad for p in reference.model.parameters())


def test_the_kl_from_final_states_in_chunks_is_the_kl_of_the_logits():
    """Unembedded a few tokens at a time under checkpointing: the same value and gradient as the
    per-token KL of every position's logits."""
    model = tiny_transformer(vocab_size=20)
    reference = FrozenCopy(model)
    with torch.no_grad():
        model.unembed.weight.add_(0.3 * torch.randn_like(model.unembed.weight))
    ids = torch.randint(20, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logits, cache = run_with(model, ids, record=["final"], attention_mask=mask)
    full = token_kl(logits, reference(ids, attention_mask=mask), mask)
    expected = grads(full)
    _, cache = run_with(model, ids, record=["final"], attention_mask=mask)
    chunked = token_kl_from_states(
        cache["final"], reference.final_states(ids, mask), mask, model.unembed, reference.unembed, chunk_tokens=4
    )
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads(chunked), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_preserve_keeps_a_fine_tune_close_to_its_start():
    """Fine-tune on the answers alone, with and without the term: every position's next-token
    distribution drifts from the start without it, far less with it."""
    task = HierarchicalEquality()
    drift = {}
    for weight in (0.0, 5.0):
        model = tiny_transformer(vocab_size=task.vocab_size, seed=1)
        reference = FrozenCopy(model)
        objective = PreserveObjective(weight=weight)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(60):
            batch = task.sample(64, step)
            ctx = _ctx(model, reference, batch, task, step)
            loss = task_loss(ctx.logits[:, -1:], batch) + weight * objective.term(ctx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held_out = task.sample(256, 10_000)
        with torch.no_grad():
            drift[weight] = float(token_kl(model(held_out["input_ids"]), reference(held_out["input_ids"]), None))
    assert drift[5.0] < 0.3 * drift[0.0], drift
