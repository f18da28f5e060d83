"""The ``caft`` objective: it ablates the concept's latents (or projects out their decoder directions)
in the step's own forward only, at the positions where they were read, chosen once and kept in
its state."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import UnknownNameError
from faithful_train.intervene.sae import SparseAutoencoder, attach_sae
from faithful_train.intervene.sites import run_with
from faithful_train.objectives.caft import CaftObjective
from faithful_train.tasks.decoy_objects import DecoyObjects
from tests.conftest import tiny_transformer
from tests.unit.sae_cases import _Module


def test_caft_ablates_the_concepts_latents_in_the_steps_forward_only():
    torch.manual_seed(0)
    task = DecoyObjects()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    width = 32
    sae = SparseAutoencoder(width, 64, k=8)
    sae.site, sae.target = "blocks.0.resid_post", None
    attach_sae(model, "blocks.0.resid_post", sae, "test")
    objective = CaftObjective(concept="decoy", positions=[-2], min_auroc=0.6, probe_examples=256, ablation="latents")
    objective.bind(model, task)
    objective.attach(_Module(model, sae))
    batch = task.sample(16, 5)
    edits = objective.step_edits(model, task, 0, batch)
    chosen = objective.ablated
    assert len(chosen) >= 1 and objective.strength >= 0.6
    ids = batch["input_ids"]
    _, clean = run_with(model, ids, record=["blocks.0.resid_post", "blocks.0.resid_post.sae"])
    logits, edited = run_with(model, ids, record=["blocks.1.resid_pre"], edits=edits)
    z = clean["blocks.0.resid_post.sae"][..., chosen]
    expected = clean["blocks.0.resid_post"].clone()
    expected[:, -2] -= z[:, -2] @ sae.W_dec[chosen]  # at the tag's position only, where they were read
    torch.testing.assert_close(edited["blocks.1.resid_pre"], expected, atol=1e-5, rtol=1e-5)
    logits.sum().backward()  # the task loss reaches the model, never the SAE
    assert all(p.grad is None for p in sae.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None if hasattr(model.blocks[0].attn, "qkv") else True
    assert objective.step_edits(model, task, 1, batch) and objective.ablated is chosen  # chosen once (refresh_every 0)
    # the paper's projection: nothing left along the chosen decoder directions, there only
    projection = CaftObjective(concept="decoy", positions=[-2], min_auroc=0.6, probe_examples=256)
    projection.bind(model, task)
    projection.attach(_Module(model, sae))
    _, projected = run_with(
        model, ids, record=["blocks.1.resid_pre"], edits=projection.step_edits(model, task, 0, batch)
    )
    directions = sae.W_dec.detach()[projection.ablated]
    torch.testing.assert_close(
        projected["blocks.1.resid_pre"][:, -2] @ directions.T, torch.zeros(16, len(directions)), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(projected["blocks.1.resid_pre"][:, :-2], clean["blocks.0.resid_post"][:, :-2])
    state = objective.state_dict()
    again = CaftObjective(concept="decoy")
    again.load_state_dict(state)
    assert torch.equal(again.ablated, chosen)
    with pytest.raises(UnknownNameError, match="variable or concept"):
        CaftObjective(concept="tag").bind(model, task)
    with pytest.raises(UnknownNameError, match="projection"):
        CaftObjective(concept="decoy", ablation="zero")
