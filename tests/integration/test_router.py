"""MoE routing from the command line: the router configs run on our MoE and on Hugging Face
ones (from a local checkpoint), bias balancing balances and resumes exactly, the audit runs
from a checkpoint, bad input is one line, and the alignment term has the effect it exists for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.io.files import read_jsonl
from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.domain_mixture import DomainMixture
from faithful_train.training.config import load_config
from tests.integration.test_cli import TINY, assert_fit_fails_in_one_line, fit_whole_and_resumed

ROUTER, BASELINE, HF = "configs/moe-router.yaml", "configs/moe-router-baseline.yaml", "configs/moe-router-hf.yaml"


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize("config", [ROUTER, BASELINE, HF])
def test_shipped_configs_run(tmp_path, config):
    assert Path(config).read_text().splitlines()[0] == f"# faithful-train fit -c {config}"
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = _metrics(tmp_path)
    for key in (
        "train/objective/router/load_balance",
        "train/objective/router/z_loss",
        "train/objective/router/max_violation",
        "audit/router/expert_concept_nmi",
        "audit/router/entropy/layer1",
        "audit/router/load_cv",
        "audit/router/routing_stability",
        "audit/router/ablation/layer0/expert3/sort",
        "audit/router/ablation/own_drop",
    ):
        assert key in metrics, key
    assert ("train/objective/router/alignment" in metrics) == (config != BASELINE)
    choices = sorted((tmp_path / "router").glob("choices_step*.jsonl"))
    assert [p.name for p in choices] == [
        "choices_step000010.jsonl",
        "choices_step000020.jsonl",
        "choices_step000030.jsonl",
    ]
    row = json.loads(choices[-1].read_text().splitlines()[0])
    assert row["token"].startswith("<") and set(row["layers"]) == {"0", "1"}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_finetune_a_local_hugging_face_checkpoint(tmp_path, family):
    task = DomainMixture()
    preset = load_config(HF, [f"model={family}-tiny"]).model
    source = HFAdapter.from_config(family, dict(preset.config), vocab_size=task.vocab_size, seed=1)
    source.save_pretrained(tmp_path / "ckpt")
    run_dir = tmp_path / "run"
    assert (
        main(["fit", "-c", HF, "--run-dir", str(run_dir), *TINY, f"model={{arch: hf, path: {tmp_path / 'ckpt'}}}"]) == 0
    )
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    layer = next(iter(source.moe_layers()))
    assert state[f"model.selection_bias_{layer}"].abs().sum() > 0  # bias balancing moved it
    loaded = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.hf_model.")}
    start = dict(source.state_dict())
    assert any(not torch.equal(loaded[k], start[k]) for k in loaded)  # it trained from the checkpoint's weights
    assert _metrics(run_dir)["audit/router/expert_concept_nmi"] >= 0


def _load_cv(run_dir: Path) -> float:
    return _metrics(run_dir)["audit/router/load_cv"]


def test_bias_balancing_balances_load_with_frozen_weights(tmp_path):
    """With the learning rate at 0 only the selection bias can move: it must balance the load."""
    frozen = [*TINY, "optim.lr=0.0", "trainer.max_steps=60", "objectives.0.load_balance=0", "objectives.0.z_loss=0"]
    assert main(["fit", "-c", BASELINE, "--run-dir", str(tmp_path / "off"), *frozen]) == 0
    assert main(["fit", "-c", BASELINE, "--run-dir", str(tmp_path / "on"), *frozen, "objectives.0.bias_rate=0.02"]) == 0
    off, on = _load_cv(tmp_path / "off"), _load_cv(tmp_path / "on")
    assert on < 0.5 * off, (on, off)
    state = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state["model.blocks.0.mlp.selection_bias"].abs().max() > 0


def test_resume_with_bias_balancing_continues_exactly(tmp_path):
    overrides = [*TINY, "trainer.max_steps=40", "trainer.checkpoint_every=20", "objectives.0.bias_rate=0.01"]
    whole, split = fit_whole_and_resumed(ROUTER, overrides, tmp_path)
    w1 = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert w1["model.blocks.1.mlp.selection_bias"].abs().max() > 0
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], msg=key)
    assert read_jsonl(split / "audits.jsonl") == read_jsonl(whole / "audits.jsonl")


def test_audit_from_a_checkpoint_reproduces_the_figures(tmp_path):
    fit_dir, audit_dir = tmp_path / "fit", tmp_path / "audit"
    assert main(["fit", "-c", ROUTER, "--run-dir", str(fit_dir), *TINY, "objectives.0.bias_rate=0.01"]) == 0
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert main(["audit", "-c", ROUTER, "--ckpt", str(ckpt), "--run-dir", str(audit_dir), *TINY]) == 0
    fitted, audited = _metrics(fit_dir), _metrics(audit_dir)
    keys = [k for k in fitted if k.startswith("audit/router/")]
    assert len(keys) > 50
    for key in keys:
        assert audited[key] == pytest.approx(fitted[key], abs=1e-6), key
    assert (audit_dir / "router" / "choices_step000030.jsonl").read_text() == (
        fit_dir / "router" / "choices_step000030.jsonl"
    ).read_text()


BAD = [
    (["objectives.0.mapping={copyy: 0}"], "unknown concept value in objective 'router''s mapping 'copyy'", "copy"),
    (["objectives.0.pooling=mean"], "unknown load-balance pooling 'mean'", "per_layer"),
    (["objectives.0.concept=colour"],
     "unknown concept of task 'domain_mixture' for objective 'router' 'colour'", "domain"),
    (["model=dense-tiny"], "needs a mixture-of-experts model", "moe-tiny"),
    (["audits.0.thresholds.nmi=0.8"], "unknown metric of audit 'router' 'nmi'", "expert_concept_nmi"),
    (["task.domains=[copy, mul]"], "unknown domain 'mul'", "reverse"),
    (["objectives.0.layers=[2]"], "unknown MoE layer for objective 'router' '2'", "valid: 0, 1"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, message, valid", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line(ROUTER, tmp_path, capsys, overrides, message, valid)


@pytest.mark.slow
def test_alignment_makes_experts_specialise_by_domain_and_ablation_shows_it(tmp_path):
    """The alignment term brings expert-domain NMI high where the usual recipe leaves it low; on
    the aligned model, ablating the expert a domain routes to hurts that domain far more than
    the others (the audit's own_drop vs other_drop, and per expert)."""
    short = [
        "trainer.max_steps=800",
        "trainer.val_every=800",
        "trainer.progress_bar=false",
        "optim.decay=none",
        "audits.0.every_n_steps=800",
        "audits.0.n_examples=512",
        "data.val_size=256",
        "logger.wandb.mode=disabled",
    ]
    assert main(["fit", "-c", BASELINE, "--run-dir", str(tmp_path / "base"), *short]) == 0
    assert main(["fit", "-c", ROUTER, "--run-dir", str(tmp_path / "aligned"), *short]) == 0
    base, aligned = _metrics(tmp_path / "base"), _metrics(tmp_path / "aligned")
    assert aligned["audit/router/expert_concept_nmi"] >= 0.8
    assert base["audit/router/expert_concept_nmi"] <= 0.5
    own, other = aligned["audit/router/ablation/own_drop"], aligned["audit/router/ablation/other_drop"]
    assert own >= 0.1 and own >= 5 * other, (own, other)
    # per domain: ablating the expert it routes to (top-1 in layer 0, read from the saved token
    # choices) hurts it more than any domain that does not route there (the learned mapping may
    # give two similar domains, e.g. copy and reverse, one expert)
    record = read_jsonl(tmp_path / "aligned" / "audits.jsonl")[-1]["metrics"]
    rows = [
        json.loads(line)
        for line in sorted((tmp_path / "aligned" / "router").glob("*.jsonl"))[-1].read_text().splitlines()
    ]
    domains = ("copy", "reverse", "sum", "sort")
    top = {}
    for domain in domains:
        experts = [r["layers"]["0"]["experts"][0] for r in rows if r["concept"] == domain and r["position"] > 0]
        top[domain] = max(set(experts), key=experts.count) if experts else None
    for domain, expert in top.items():
        if expert is None:
            continue
        drops = {d: record[f"ablation/layer0/expert{expert}/{d}"] for d in domains}
        elsewhere = [drops[d] for d in domains if top[d] != expert]
        assert drops[domain] > max(elsewhere, default=0.0), (domain, expert, drops, top)
