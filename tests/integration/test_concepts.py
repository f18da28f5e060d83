"""Concept bottlenecks from the command line: the shipped configs run and write the
intervention curve, every mode and a Hugging Face backbone (from a local checkpoint) train, a
hybrid run resumes exactly, the audit runs from a checkpoint, bad input is one line, and the
leakage figure moves the way the side channel and its penalty say it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.io.files import read_jsonl
from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.concept_objects import ConceptObjects
from tests.integration.test_cli import TINY, assert_fit_fails_in_one_line, fit_whole_and_resumed

HARD, JOINT, BASELINE = "configs/concepts-hard.yaml", "configs/concepts-joint.yaml", "configs/concepts-baseline.yaml"


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize("config", [HARD, JOINT, BASELINE])
def test_shipped_configs_run(tmp_path, config):
    assert Path(config).read_text().splitlines()[0] == f"# faithful-train fit -c {config}"
    tiny = [o for o in TINY if not o.startswith("audits.")] if config == BASELINE else TINY
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *tiny]) == 0
    metrics = _metrics(tmp_path)
    assert "val/task_acc" in metrics
    if config == BASELINE:
        return
    for key in (
        "train/objective/concepts/concept",
        "train/objective/concepts/intervention",
        "audit/concepts/concept_acc/shape",
        "audit/concepts/tti/0",
        "audit/concepts/tti/4",
        "audit/concepts/tti_area",
        "audit/concepts/leakage",
    ):
        assert key in metrics, key
    assert ("audit/concepts/leakage/side" in metrics) == (config == JOINT)
    curves = sorted(p.name for p in (tmp_path / "concepts").iterdir())
    assert curves == [f"intervention_step{s:06d}.{ext}" for s in (10, 20, 30) for ext in ("csv", "png")]


@pytest.mark.parametrize("mode", ["embedding", "hard"])
def test_other_modes_from_overrides(tmp_path, mode):
    extra = ["objectives.0.leakage=0", *(["model.bottleneck.discrete=true"] if mode == "hard" else [])]
    assert main(["fit", "-c", JOINT, "--run-dir", str(tmp_path), *TINY, f"model.bottleneck.mode={mode}", *extra]) == 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert ("model.bottleneck.value_embeddings.weight" in state) == (mode == "embedding")
    assert 0 <= _metrics(tmp_path)["audit/concepts/tti_area"] <= 1


def test_finetune_a_local_hugging_face_checkpoint_with_a_bottleneck(tmp_path):
    task = ConceptObjects()
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
    )
    source = HFAdapter.from_config("llama", config, vocab_size=task.vocab_size, seed=1)
    source.save_pretrained(tmp_path / "ckpt")
    model = f"model={{arch: hf, path: {tmp_path / 'ckpt'}, bottleneck: {{mode: hybrid, layer: 1}}}}"
    assert main(["fit", "-c", JOINT, "--run-dir", str(tmp_path / "run"), *TINY, model]) == 0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    start = source.state_dict()
    trained = {k[len("model.backbone.") :]: v for k, v in state.items() if k.startswith("model.backbone.hf_model.")}
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # it trained from the checkpoint's weights
    layer2 = [k for k in trained if ".layers.2." in k]
    assert layer2 and all(torch.equal(trained[k], start[k]) for k in layer2)  # above the bottleneck: never ran
    assert "model.bottleneck.side.weight" in state and "audit/concepts/leakage/side" in _metrics(tmp_path / "run")


def test_resume_of_a_noisy_hybrid_run_continues_exactly(tmp_path):
    overrides = [*TINY, "trainer.max_steps=40", "trainer.checkpoint_every=20"]
    whole, split = fit_whole_and_resumed(JOINT, overrides, tmp_path)
    w1 = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert int(w1["model.bottleneck.noise_draws"]) == 80  # the forward and the intervention readout, per step
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], msg=key)
    assert read_jsonl(split / "audits.jsonl") == read_jsonl(whole / "audits.jsonl")


def test_audit_from_a_checkpoint_reproduces_the_figures(tmp_path):
    fit_dir, audit_dir = tmp_path / "fit", tmp_path / "audit"
    assert main(["fit", "-c", JOINT, "--run-dir", str(fit_dir), *TINY]) == 0
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert main(["audit", "-c", JOINT, "--ckpt", str(ckpt), "--run-dir", str(audit_dir), *TINY]) == 0
    fitted, audited = _metrics(fit_dir), _metrics(audit_dir)
    keys = [k for k in fitted if k.startswith("audit/concepts/")]
    assert len(keys) >= 15
    for key in keys:
        assert audited[key] == pytest.approx(fitted[key], abs=1e-6), key
    name = "intervention_step000030.csv"
    assert (audit_dir / "concepts" / name).read_text() == (fit_dir / "concepts" / name).read_text()


BAD = [
    (["model.bottleneck.mode=soft"], "unknown bottleneck mode 'soft'", "embedding, hard, hybrid"),
    (["model.bottleneck.width=3"], "unknown config key 'model.bottleneck.width'", "side_width"),
    (["model.bottleneck.concepts=[colour, weight]"], "unknown concept for model.bottleneck 'weight'", "material"),
    (["model=dense-tiny"], "objective 'concepts' needs a model with a concept bottleneck", "bottleneck: {mode: hard}"),
    (["model.bottleneck.mode=hard"], "the leakage penalty acts on a hybrid bottleneck", "'hard'"),
    (["task={name: hierarchical_equality}"], "needs a task that labels concepts", "labels none"),
    (["audits.0.thresholds.tti/9=0.5"], "unknown metric of audit 'concepts' 'tti/9'", "tti_area"),
    (["audits.0.order=greedy"], "unknown intervention order 'greedy'", "random, uncertainty"),
]


@pytest.mark.parametrize("overrides, message, valid", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line(JOINT, tmp_path, capsys, overrides, message, valid)


@pytest.mark.slow
def test_leakage_rises_with_the_side_channel_and_falls_with_its_penalty(tmp_path):
    """On a rule that also depends on an unlabelled attribute (``hidden_concept``): a hard
    bottleneck has nothing to leak it through; opening an 8-unit side channel without a penalty
    leaks it (the leakage figure up, and task accuracy above the hard model's); the leakage
    penalty on the same channel brings the figure back down."""
    short = [
        *TINY[2:],
        "task.hidden_concept=true",
        "trainer.max_steps=300",
        "trainer.val_every=300",
        "optim.decay=none",
        "audits.0.every_n_steps=300",
        "audits.0.n_examples=1024",
        "data.batch_size=64",
    ]
    runs = {
        "hard": (HARD, []),
        "open": (JOINT, ["objectives.0.leakage=0"]),
        "penalised": (JOINT, ["objectives.0.leakage=1.0"]),
    }
    figures = {}
    for name, (config, extra) in runs.items():
        assert main(["fit", "-c", config, "--run-dir", str(tmp_path / name), *short, *extra]) == 0
        figures[name] = _metrics(tmp_path / name)
    leak = {name: m["audit/concepts/leakage"] for name, m in figures.items()}
    acc = {name: m["audit/concepts/task_acc"] for name, m in figures.items()}
    assert leak["open"] >= 0.3 and acc["open"] >= acc["hard"] + 0.2, (leak, acc)  # it uses what leaks
    assert leak["hard"] <= 0.1 and acc["hard"] <= 0.55, (leak, acc)
    assert leak["penalised"] <= leak["open"] - 0.15, (leak, acc)
    assert figures["open"]["audit/concepts/leakage/side"] >= 0.25
