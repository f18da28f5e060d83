"""Fine-tuning at scale, from the command line: LoRA on a saved Hugging Face model (checkpoints
that hold the adapters and name the base, audit, resume, export with and without --merge),
activation checkpointing and bf16 through Lightning, and the bad inputs they bring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.modeling.hf import HFAdapter
from tests.integration.test_cli import QUICKSTART, TINY, assert_fit_fails_in_one_line, fit_whole_and_resumed

LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=16,
)


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def saved_llama(where: Path, seed: int = 0) -> Path:
    """A tiny llama as a user's pretrained checkpoint: a save_pretrained directory."""
    HFAdapter.from_config("llama", LLAMA, vocab_size=32, seed=seed).save_pretrained(where)
    return where


def lora_overrides(base: Path) -> list[str]:
    return [
        *TINY,
        f"model={{arch: hf, path: {base}, lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj, down_proj]}}}}",
        "objectives=[{name: interchange, alignment: {left: {site: blocks.0.resid_post, positions: [3], dims: [0, 32]}, "
        "right: {site: blocks.0.resid_post, positions: [3], dims: [32, 64]}}}, {name: preserve}]",
    ]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_a_lora_run_checkpoints_its_adapters_audits_resumes_and_exports(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = saved_llama(tmp_path / "base")
    overrides = [*lora_overrides(base), "trainer.max_steps=40", "trainer.checkpoint_every=20"]
    whole, split = fit_whole_and_resumed(QUICKSTART, overrides, tmp_path)
    state = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    params = {k for k in state["state_dict"] if k.startswith("model.")}
    assert params and all("lora_" in k for k in params)  # the trainable weights only
    assert state["faithful_train"]["base"]  # and the base they were trained on, by hash
    a, b = _summary(whole), _summary(split)
    for key in a["metrics"]:  # the resumed LoRA run is the uninterrupted one
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), key
    assert "val/kl_to_start" in a["metrics"] and "train/objective/preserve" in a["metrics"]

    ckpt = whole / "checkpoints" / "last.ckpt"
    audit_dir = tmp_path / "audit"
    assert main(["audit", "-c", QUICKSTART, "--ckpt", str(ckpt), "--run-dir", str(audit_dir), *overrides]) == 0
    assert _summary(audit_dir)["metrics"]["audit/interchange/iia"] == pytest.approx(
        a["metrics"]["audit/interchange/iia"], abs=1e-6
    )

    other = saved_llama(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert (
        main(["audit", "-c", QUICKSTART, "--ckpt", str(ckpt), "--run-dir", str(tmp_path / "x"), *lora_overrides(other)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "holds adapters trained on another base model" in err and err.count("\n") == 0

    ids = torch.randint(1, 32, (2, 4), generator=torch.Generator().manual_seed(0))
    from faithful_train.commands.loading import load_model

    expected = load_model(whole)(ids)
    assert main(["export", str(whole), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert main(["export", str(whole), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_checkpointing_changes_no_weight_and_bf16_runs(tmp_path):
    """Ten steps of the quickstart with and without activation checkpointing: the same weights
    (1e-6, fp32). Then bf16-mixed with checkpointing: the run completes with finite figures."""
    weights = []
    for name, extra in (("plain", []), ("recomputed", ["model.activation_checkpointing=true"])):
        overrides = [*TINY, "trainer.max_steps=10", "audits=[]", *extra]
        assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / name), *overrides]) == 0
        weights.append(torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-6, rtol=1e-5, msg=key)
    bf16 = [
        *TINY,
        "trainer.precision=bf16-mixed",
        "model.activation_checkpointing=true",
        "objectives.0.subspace=learned",
        "objectives.0.alignment.left.dims=[0,8]",
        "objectives.0.alignment.right.dims=[8,16]",
    ]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "bf16"), *bf16]) == 0
    metrics = _summary(tmp_path / "bf16")["metrics"]
    assert all(value == value for value in metrics.values())  # finite (no NaN)


def _mismatched_run(tmp_path: Path) -> Path:
    run = tmp_path / "small"
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(run), *TINY, "trainer.max_steps=2", "audits=[]"]) == 0
    return run / "checkpoints" / "last.ckpt"


def test_a_checkpoint_of_another_shape_is_one_line_in_audit_resume_and_verify(tmp_path, capsys):
    ckpt = _mismatched_run(tmp_path)
    capsys.readouterr()
    wider = [*TINY, "model.d_mlp=128"]
    for args in (
        ["audit", "-c", QUICKSTART, "--ckpt", str(ckpt), "--run-dir", str(tmp_path / "a"), *wider],
        ["fit", "-c", QUICKSTART, "--resume-from", str(ckpt), "--run-dir", str(tmp_path / "b"), *wider],
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert (
            err.count("\n") == 0
            and "does not fit the config's model: model.blocks.0.mlp.up.weight is [256, 64] there and [128, 64] here"
            in err
        ), err
    hypothesis = tmp_path / "small" / "hypotheses" / "interchange.json"
    assert main(["verify", str(hypothesis), "--ckpt", str(ckpt)]) == 0  # the run's own config: fits
    (tmp_path / "small" / "config.yaml").write_text(
        (tmp_path / "small" / "config.yaml").read_text().replace("d_mlp: 256", "d_mlp: 128")
    )
    assert main(["verify", str(hypothesis), "--ckpt", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is [256, 64] there and [128, 64] here" in err, err


SCALE_BAD_INPUTS = [
    (["model.lora={target_modules: [qkv, nope]}"],
     "'model.lora.target_modules.1' ('nope') names no linear layer", "qkv"),
    (["model=cbm-tiny", "model.lora={r: 4}", "task={name: concept_objects}", "objectives=[]", "audits=[]"],
     "model.lora: a concept-bottleneck model", "LoRA"),
    (["model.activation_checkpointing=true",
      "objectives.0={name: tests/integration/assets/plain_objective.py:PlainObjective}"],
     ("objectives.0: objective 'plain' (PlainObjective) does not declare that it supports "
      "model.activation_checkpointing"),
     "supports_activation_checkpointing = True"),
    (["trainer.precision=16-mixed"], "'trainer.precision' is '16-mixed': fp16 needs a CUDA device", "bf16-mixed"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, message, valid", SCALE_BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line(QUICKSTART, tmp_path, capsys, overrides, message, valid)
