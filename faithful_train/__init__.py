"""faithful_train: interpretability objectives and audits while training, on PyTorch Lightning.

From Python, ``load_model`` and ``wrap`` give a model with the canonical sites (docs/guide/sites.md)."""

from faithful_train.commands.loading import load_model, load_run, wrap

__all__ = ["load_model", "load_run", "wrap"]
