"""The recipes run as a user would run them, on tiny settings."""

import json
import runpy
import sys

import pytest

TINY = [
    "trainer.max_steps=6",
    "trainer.val_every=3",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=3",
    "audits.0.n_examples=32",
    "data.batch_size=16",
    "data.val_size=32",
    "logger.wandb.mode=disabled",
]


def _run(path, args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [path, *args])
    runpy.run_path(path, run_name="__main__")


def test_pretrain_and_audit(tmp_path, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    _run("recipes/pretrain_and_audit.py", ["configs/quickstart.yaml", f"run_dir={tmp_path}", *TINY], monkeypatch)
    out = capsys.readouterr().out
    assert "from checkpoint" in out
    fitted = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    audited = json.loads((tmp_path / "re-audit" / "summary.json").read_text())["metrics"]
    for key, value in audited.items():
        assert value == pytest.approx(fitted[key], abs=1e-6)


def test_finetune_hf_from_a_local_directory(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    model_dir, run_dir = tmp_path / "gpt2", tmp_path / "run"
    _run("recipes/finetune_hf.py", ["--make-tiny", str(model_dir), f"run_dir={run_dir}", *TINY], monkeypatch)
    assert (model_dir / "config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and "audit/interchange/iia" in summary["metrics"]


def test_finetune_hf_through_a_concept_bottleneck(tmp_path, repo, monkeypatch):
    monkeypatch.chdir(repo)
    model_dir, run_dir = tmp_path / "llama", tmp_path / "run"
    _run("recipes/finetune_hf_concepts.py", ["--make-tiny", str(model_dir), f"run_dir={run_dir}", *TINY], monkeypatch)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6 and "audit/concepts/leakage/side" in summary["metrics"]
    assert (run_dir / "concepts" / "intervention_step000006.png").is_file()
