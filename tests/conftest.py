from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    # under pytest-xdist (`make test`: -n 2 --dist loadgroup) the DDP tests, which start two
    # processes each, all run on one worker, one after another
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.xdist_group("ddp"))
    # the long tests first, so the two workers share them and end together (a long test
    # scheduled last would leave one core idle while it runs)
    items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.get_closest_marker("distributed")))


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # tiny models: one thread is faster than two fighting over the CI's two cores
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo() -> Path:
    return REPO


def tiny_transformer(vocab_size: int = 20, n_experts: int = 0, seed: int = 0, **kw):
    from faithful_train.modeling.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, max_seq_len=8, d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_experts=n_experts)
    return Transformer(TransformerConfig(**(cfg | kw)))


def unperturbed_task(**kw):
    """Hierarchical equality without its perturbations: a task that has none (bad-input tests)."""
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality

    class Unperturbed(HierarchicalEquality):
        provides = frozenset()  # declares none (and has none)

        def perturb(self, batch, generator):
            return None

        def perturb_aligned(self, batch, generator):
            return None

    return Unperturbed(**kw)


def run_peer(script_args: list[str], lib_variable: str, what: str, timeout: int = 300):
    """Run ``benchmarks/<script> ...`` in a process of its own with a peer library beside the
    venv (``$lib_variable`` = ``.bench``), so the peer's packages never enter the test's; skip the
    test when the peer is not installed (the script exits 3), fail on any other error."""
    import subprocess
    import sys

    env = {**os.environ, lib_variable: str(REPO / ".bench"), "TQDM_DISABLE": "1"}
    done = subprocess.run(
        [sys.executable, *script_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode == 3:
        pytest.skip(f"{what} is not importable: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done
