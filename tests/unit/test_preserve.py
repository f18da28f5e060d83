"""The ``preserve`` objective: KL to the frozen start, per real token; it is zero at the start and
it keeps a model that fine-tunes on answers close to where it started (with it vs. without it)."""

from __future__ import annotations

import torch

from faithful_train.batches import token_kl
from faithful_train.modeling import frozen_copy
from faithful_train.module import task_loss
from faithful_train.objectives.base import StepContext
from faithful_train.objectives.preserve import PreserveObjective
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer


def _ctx(model, reference, batch, task, step=0):
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return StepContext(batch, logits, {}, model, task, step, torch.Generator().manual_seed(0), reference=reference)


def test_term_is_the_per_token_kl_and_zero_at_the_start():
    task = HierarchicalEquality()
    model = tiny_transformer(vocab_size=task.vocab_size)
    reference = frozen_copy(model)
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
    assert not any(p.requires_grad for p in reference.parameters())


def test_preserve_keeps_a_fine_tune_close_to_its_start():
    """Fine-tune on the answers alone, with and without the term: every position's next-token
    distribution drifts from the start without it, far less with it."""
    task = HierarchicalEquality()
    drift = {}
    for weight in (0.0, 5.0):
        model = tiny_transformer(vocab_size=task.vocab_size, seed=1)
        reference = frozen_copy(model)
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
