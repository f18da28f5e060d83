"""Shared by the SAE tests: an SAE that reconstructs exactly, and the stand-in for a FaithfulModule
that the ``sae`` audit and the ``caft`` objective read an SAE from (``objective_modules["sae"]``)."""

import torch

from faithful_train.intervene.sae import SparseAutoencoder


def _identity_sae(width):
    """Reconstructs exactly: latents are the positive and negative parts of x."""
    sae = SparseAutoencoder(width, 2 * width, k=2 * width, normalize_decoder=False)
    eye = torch.eye(width)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_dec.zero_()
    return sae


class _Module(torch.nn.Module):
    def __init__(self, model, sae):
        super().__init__()
        self.model, self.objective_modules = model, torch.nn.ModuleDict({"sae": sae})
