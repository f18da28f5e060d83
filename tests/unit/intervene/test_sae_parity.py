"""Parity with EleutherAI's sparsify (a peer installed beside the venv: make .bench/sparsify):
with the same weights and rows, our TopK SAE's latents, reconstruction, FVU, AuxK and gradients
equal ``SparseCoder``'s. sparsify runs in a process of its own, so its packages never enter
this one; skipped when it is not installed."""

from __future__ import annotations

import pytest
import torch

from faithful_train.intervene.sae import SparseAutoencoder
from tests.conftest import run_peer


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_topk_sae_equals_sparsify(tmp_path, sparse):
    torch.manual_seed(0)
    sae = SparseAutoencoder(16, 64, k=4, sparse=sparse)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.encoder.bias.normal_(0, 0.1)
    rows = torch.randn(48, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    torch.save(
        {"d_in": 16, "n_latents": 64, "k": 4, "state": sae.state_dict(), "rows": rows, "dead": dead}, tmp_path / "in.pt"
    )
    run_peer(
        ["benchmarks/sae.py", "--parity", str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], "SPARSIFY_LIB", "sparsify"
    )
    theirs = torch.load(tmp_path / "out.pt")
    out = sae(rows, dead_mask=dead)
    (out.fvu + out.auxk).backward()
    torch.testing.assert_close(out.latents, theirs["latents"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.reconstruction, theirs["reconstruction"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.fvu, theirs["fvu"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.auxk, theirs["auxk"], atol=1e-6, rtol=1e-5)
    assert out.auxk > 0
    torch.testing.assert_close(sae.W_dec.grad, theirs["grad_W_dec"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.b_dec.grad, theirs["grad_b_dec"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sae.encoder.weight.grad, theirs["grad_W_enc"], atol=1e-5, rtol=1e-4)
