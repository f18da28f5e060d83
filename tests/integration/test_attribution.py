"""Explanation-stability configs from the command line: each runs, logs its terms and the
attribution audit's figures; the decoy task's baseline learns the shortcut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.io.files import read_jsonl
from tests.integration.test_cli import TINY, assert_fit_fails_in_one_line, fit_whole_and_resumed

CONFIGS = [
    "configs/stability.yaml",
    "configs/stability-baseline.yaml",
    "configs/right-reasons-decoy.yaml",
    "configs/right-reasons-decoy-baseline.yaml",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_configs_run(tmp_path, config):
    assert Path(config).read_text().splitlines()[0] == f"# faithful-train fit -c {config}"
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for key in (
        "audit/attribution/stability/spearman",
        "audit/attribution/randomisation/spearman",
        "audit/attribution/eraser/comprehensiveness",
        "audit/attribution/calibration",
        "audit/attribution/completeness_error",
    ):
        assert key in metrics, key
    if config.startswith("configs/stability"):  # and the gradient x input audit beside it
        assert {"audit/attribution_gxi/stability/cosine", "audit/attribution/stability/cosine"} <= set(metrics)
    else:  # the decoy task marks the tag and the noise
        assert "audit/attribution/irrelevant_share" in metrics
    if "baseline" not in config:
        term = "stability" if config.endswith("stability.yaml") else "counterfactual"
        assert f"train/objective/stability/{term}" in metrics


def _fit_short(tmp_path: Path, config: str, *overrides: str) -> dict:
    run_dir = tmp_path / Path(config).stem
    assert (
        main(
            [
                "fit",
                "-c",
                config,
                "--run-dir",
                str(run_dir),
                "trainer.progress_bar=false",
                "logger.wandb.mode=disabled",
                "optim.decay=none",
                "data.batch_size=64",
                *overrides,
            ]
        )
        == 0
    )
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_right_reasons_term_escapes_the_decoy(tmp_path):
    """The tag names the label in every training example and is random at test: trained the
    usual way the model reads the tag and sits at chance on the test set; the right-reasons
    penalty on the tag's (and the noise's) input gradients makes it learn the rule instead."""
    short = ["audits=[]", "trainer.max_steps=400", "trainer.val_every=400", "data.val_size=512"]
    gradients = ["objectives.0.right_reasons=10", "objectives.0.counterfactual=0"]  # Ross et al.'s term alone
    penalised = _fit_short(tmp_path, "configs/right-reasons-decoy.yaml", *short, *gradients)["val/task_acc"]
    baseline = _fit_short(tmp_path, "configs/right-reasons-decoy-baseline.yaml", *short)["val/task_acc"]
    assert baseline <= 0.3, baseline  # chance is 0.25: the shortcut
    assert penalised >= baseline + 0.15, (
        penalised,
        baseline,
    )  # 400 steps: 0.86 against 0.27 (3000 steps: 0.41 to 1.00 over seeds, docs/results.md#decoy)


@pytest.mark.slow
def test_the_counterfactual_term_escapes_the_decoy(tmp_path):
    """The counterfactual form of the same annotation: the tag (and the noise) swapped between
    examples, the answer kept. With it alone the model learns the rule within 600 steps; the
    same recipe without it reads the tag and sits at chance on the test set."""
    short = ["audits=[]", "trainer.max_steps=600", "trainer.val_every=600", "data.val_size=512"]
    only = ["objectives.0.right_reasons=0", "objectives.0.counterfactual=1.0"]
    swapped = _fit_short(tmp_path, "configs/right-reasons-decoy.yaml", *short, *only)["val/task_acc"]
    baseline = _fit_short(tmp_path, "configs/right-reasons-decoy-baseline.yaml", *short)["val/task_acc"]
    assert baseline <= 0.3 and swapped >= 0.8, (swapped, baseline)  # 300 steps: 0.60 against 0.27


@pytest.mark.slow
def test_stability_objective_makes_attributions_stable_under_perturbation(tmp_path):
    """Same task, transformer and steps, with and without the stability objective: the audit's
    gradient x input attributions of held-out examples and their perturbations (new order, new
    noise) agree in direction (cosine) far more with the objective, and in rank order (Spearman)
    more, at no cost in task accuracy."""
    # 1500 steps. At 1000 the run with the objective had not settled on every float path: cosine
    # 1.000 with two threads, but 0.959 (and task accuracy 0.969) with the tests' one thread, after
    # the step's unembedding changed (2026-12-07). At 1500, one thread: cosine 1.000 against 0.678,
    # Spearman 0.854 against 0.581, both accuracies 1.000.
    gxi_audit = (
        "{name: attribution, method: gradient_x_input, every_n_steps: 1500, n_examples: 512, "
        "randomisation: false, calibration: false}"
    )
    short = ["trainer.max_steps=1500", "trainer.val_every=1500", "data.val_size=512", f"audits=[{gxi_audit}]"]
    stable = _fit_short(tmp_path, "configs/stability.yaml", *short)
    plain = _fit_short(tmp_path, "configs/stability-baseline.yaml", *short)
    figure = lambda m, name: m[f"audit/attribution/stability/{name}"]  # noqa: E731
    assert figure(stable, "cosine") >= 0.99 and figure(plain, "cosine") <= 0.9, (stable, plain)
    # rank order moves the same way, less far and less reliably: four of the five aligned tokens
    # matter equally (the label is their sum), so their order is partly a coin flip. Measured at
    # 600 steps: 0.77 vs 0.71 on 1 thread, 0.92 vs 0.64 on 2 (the runs part ways in float
    # rounding); 3000 steps: 0.994 vs 0.813 (docs/results.md)
    assert figure(stable, "spearman") > figure(plain, "spearman"), (stable, plain)
    assert stable["val/task_acc"] >= plain["val/task_acc"] - 0.01, (stable, plain)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_both_terms_train_a_hugging_face_model(tmp_path, preset):
    """Double backprop through a Hugging Face model (generic hooked path): every term (the two
    attribution terms and the counterfactual one) is logged, finite, and the audit measures the
    fine-tuned model."""
    overrides = [
        *TINY,
        "trainer.max_steps=10",
        f"model={preset}",
        "objectives.0.stability=1.0",
        "objectives.0.right_reasons=10.0",
        "objectives.0.fraction=0.25",
    ]
    # on the tiny random llama, zero-baseline IG does not converge (completeness error 1.3 at 512
    # points): the points go up to the cap and the audit says so; a low cap keeps the test short
    overrides.append("audits.0.max_steps=64")
    assert main(["fit", "-c", "configs/right-reasons-decoy.yaml", "--run-dir", str(tmp_path), *overrides]) == 0
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    for term in ("stability", "right_reasons", "counterfactual"):
        assert 0 <= metrics[f"train/objective/stability/{term}"] < float("inf"), term
    assert 0 <= metrics["audit/attribution/irrelevant_share"] <= 1
    assert metrics["audit/attribution/trusted"] in (0.0, 1.0) and 32 <= metrics["audit/attribution/steps"] <= 64


def test_a_stopped_run_resumes_exactly(tmp_path):
    """Both terms draw their rows and perturbations from the step's seeded generator, so a run
    stopped at step 20 and resumed ends with the weights of an uninterrupted one."""
    overrides = [*TINY, "trainer.max_steps=40", "trainer.checkpoint_every=20", "objectives.0.stability=1.0"]
    whole, split = fit_whole_and_resumed("configs/right-reasons-decoy.yaml", overrides, tmp_path)
    w1 = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], msg=key)
    assert read_jsonl(split / "audits.jsonl") == read_jsonl(whole / "audits.jsonl")


@pytest.mark.parametrize(
    "overrides, message, valid",
    [
        (["objectives.0.method=saliency"], "unknown attribution method 'saliency'", "integrated_gradients"),
        (["audits.0.quadrature=simpson"], "unknown quadrature 'simpson'", "gausslegendre"),
        (["objectives.0.quadrature=simpson"], "unknown quadrature 'simpson'", "gausslegendre"),
        (["objectives.0.right_reasons=-1"], "right_reasons must be >= 0", "-1"),
        (["objectives.0.fraction=0"], "0 < fraction <= 1", "fraction"),
        (
            ["task.name=hierarchical_equality"],
            "counterfactual needs a task that marks irrelevant tokens",
            "hierarchical_equality",
        ),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line("configs/right-reasons-decoy.yaml", tmp_path, capsys, overrides, message, valid)
