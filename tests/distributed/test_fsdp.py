"""Two CPU processes under ``trainer.strategy=fsdp`` (FSDP2 on gloo): the same weights as DDP,
audits equal to one process re-auditing the gathered checkpoint, and with LoRA on a saved model
the frozen base holds no gradient on any rank while adapters and rotations train."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faithful_train.io.files import read_jsonl
from tests.distributed.cli import TWO_RANKS, audit_alone, cli
from tests.integration.test_scale import saved_llama

pytestmark = pytest.mark.distributed

TWO = [*TWO_RANKS, "audits.0.every_n_steps=4", "audits.0.n_examples=64"]
DAS = [
    "objectives.0.subspace=learned",
    "objectives.0.alignment.left.dims=[0,8]",
    "objectives.0.alignment.right.dims=[8,16]",
    "model.activation_checkpointing=true",
]


def _fit(repo: Path, run_dir: Path, *overrides: str) -> None:
    cli(repo, "fit", "-c", "configs/quickstart.yaml", "--run-dir", str(run_dir), *TWO, *overrides)


def test_fsdp_trains_as_ddp_does_and_its_audits_are_a_single_process_audit(tmp_path, repo):
    _fit(repo, tmp_path / "fsdp", "trainer.strategy=fsdp", *DAS)
    _fit(repo, tmp_path / "ddp", "trainer.strategy=ddp", *DAS)
    sharded = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    replicated = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert sharded.keys() == replicated.keys() and any(k.startswith("objective_modules.") for k in sharded)
    for key in sharded:  # whole tensors in the checkpoint, equal to DDP's but for the order of float sums
        torch.testing.assert_close(sharded[key], replicated[key], atol=2e-5, rtol=1e-4, msg=key)
    records = read_jsonl(tmp_path / "fsdp" / "audits.jsonl")
    assert [r["step"] for r in records] == [4, 8]
    ckpt = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    alone = audit_alone(repo, "configs/quickstart.yaml", ckpt, tmp_path / "single", "audits.0.n_examples=64", *DAS)
    for key, value in records[-1]["metrics"].items():
        assert alone[f"audit/interchange/{key}"] == pytest.approx(value, abs=1e-6), key
    hypothesis = json.loads((tmp_path / "fsdp" / "hypotheses" / "interchange.json").read_text())
    assert hypothesis["weights_hash"]  # hashed from the gathered weights on every rank


def test_fsdp_with_lora_gives_the_frozen_base_no_gradient(tmp_path, repo):
    base = saved_llama(tmp_path / "base")
    overrides = [
        *TWO,
        "trainer.strategy=fsdp",
        "trainer.max_steps=4",
        "audits.0.every_n_steps=2",
        f"model={{arch: hf, path: {base}, lora: {{r: 4, target_modules: [q_proj, v_proj]}}, "
        f"activation_checkpointing: true}}",
        *DAS[:3],
    ]
    probe = Path(__file__).with_name("fsdp_probe.py")
    proc = subprocess.run(
        [sys.executable, str(probe), str(tmp_path), "configs/quickstart.yaml", *overrides],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        grads = json.loads((tmp_path / f"grads.{rank}.json").read_text())
        frozen = {n: g for n, g in grads.items() if not g["trainable"]}
        trainable = {n: g for n, g in grads.items() if g["trainable"]}
        assert frozen and not any(g["grad"] for g in frozen.values())  # no gradient memory for the base
        assert all(g["grad"] for g in trainable.values())  # adapters and the rotation train
        assert any(g["sharded"] for n, g in trainable.items() if "lora_" in n)  # adapters are sharded units
        assert not any(g["sharded"] for n, g in trainable.items() if n.startswith("objective_modules."))  # replicated
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all("lora_" in k for k in state["state_dict"] if k.startswith("model.") and "selection_bias" not in k)
    assert state["faithful_train"]["base"]
