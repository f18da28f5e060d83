"""Mixed precision (``trainer.precision: bf16-mixed`` / ``16-mixed``): every objective's step under
autocast gives the fp32 step's gradients to bf16's accuracy, its own parameters (rotations, SAEs)
stay fp32, and under fp16 the gradient scaler reaches every term (its gradients are scaled too).

Lightning runs the training step under ``torch.autocast``; these tests run the same step under
it directly (CPU autocast has both bf16 and fp16; Lightning allows only bf16 on a CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faithful_train.intervene.interventions import interchange
from faithful_train.intervene.rotation import OrthonormalBasis
from faithful_train.intervene.sae import SparseAutoencoder
from tests.unit.objective_cases import CASES, Case, gradients, step_loss


def _flat(grads: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].float().flatten() for n in names])


def _agree(low: dict, full: dict, case: Case, floor: float) -> None:
    """The gradient of the model and of each objective's own module points the fp32 way."""
    assert low.keys() == full.keys()
    groups = {"model": [n for n in full if n.startswith("model.")]}
    groups |= {label: [n for n in full if n.startswith(f"{label}.")] for label in case.owned}
    for group, names in groups.items():
        if not names or float(_flat(full, names).norm()) < 1e-8:
            continue
        cosine = F.cosine_similarity(_flat(low, names), _flat(full, names), dim=0)
        assert cosine > floor, f"{group}: cosine {float(cosine):.4f} with the fp32 gradient"


@pytest.mark.parametrize("name", list(CASES))
def test_a_bf16_autocast_step_has_the_fp32_steps_gradients(name: str):
    full_case, low_case = CASES[name](), CASES[name]()
    full = gradients(full_case, step_loss(full_case))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step_loss(low_case)
    assert torch.isfinite(loss)
    low = gradients(low_case, loss)
    _agree(low, full, low_case, floor=0.98)
    for label, module in low_case.owned.items():  # rotations and SAEs stay fp32
        assert all(p.dtype == torch.float32 for p in module.parameters()), label


@pytest.mark.parametrize("name", list(CASES))
def test_the_fp16_grad_scaler_sees_every_term(name: str):
    """Scaled by the scaler, every term's gradient is scaled: unscaled, they equal fp32's to fp16's
    accuracy, objectives' own parameters included."""
    full_case, low_case = CASES[name](), CASES[name]()
    full = gradients(full_case, step_loss(full_case))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = step_loss(low_case)
    scaled = gradients(low_case, scaler.scale(loss))
    unscaled = {n: g / scaler.get_scale() for n, g in scaled.items()}
    assert all(torch.isfinite(g).all() for g in unscaled.values())
    _agree(unscaled, full, low_case, floor=0.98)


def test_rotations_and_sae_compute_in_fp32_under_autocast():
    basis = OrthonormalBasis(16, 4)
    base, source = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    mask = torch.ones(1, 5, 1, dtype=torch.bool)
    exact = interchange(base, source, mask, basis.basis)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = basis.basis
        mixed = interchange(base, source, mask, q)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q.T @ q, torch.eye(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed, exact)  # the swap itself: fp32
    sae = SparseAutoencoder(16, 32, k=4)
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, latents = sae(x), sae.encode(x)
    assert latents.dtype == torch.float32 and out.fvu.dtype == torch.float32
    torch.testing.assert_close(out.fvu, sae(x).fvu)
