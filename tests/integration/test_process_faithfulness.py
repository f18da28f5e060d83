"""Process faithfulness from the command line: the DAS, strict and chain-of-thought configs run,
their learned parameters are checkpointed, resumed and audited, and the strict term has the
causal effect it exists for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.commands.verify import format_drift, verify
from faithful_train.intervene.hypotheses import Hypothesis
from faithful_train.io.files import read_jsonl
from faithful_train.training import run as runs
from faithful_train.training.config import load_config
from tests.integration.test_cli import TINY, assert_fit_fails_in_one_line, fit_whole_and_resumed

DAS = "configs/iit-das.yaml"
ACTIVE = ["objectives.0.schedule=constant"]  # the shipped schedule starts the term at step 1000


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["metrics"]


@pytest.mark.parametrize(
    "config, keys",
    [
        (DAS, ["train/objective/das", "audit/interchange/iia/left", "audit/interchange/control/random_subspace/iia",
               "audit/interchange/control/random_model/iia/right"]),
        ("configs/iit-das-baseline.yaml", ["train/objective/das", "audit/interchange/control/random_model/iia"]),
        ("configs/cot-faithful.yaml", ["train/objective/counterfactual_cot", "audit/cot/follow_rate",
                                       "audit/cot/early_aoc", "audit/cot/filler_acc", "audit/cot/follow_rate/step2"]),
        ("configs/cot-faithful-baseline.yaml", ["audit/cot/follow_rate", "audit/cot/early/1"]),
    ],
)  # fmt: skip
def test_shipped_configs_run(tmp_path, config, keys):
    assert Path(config).read_text().splitlines()[0] == f"# faithful-train fit -c {config}"
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path), *TINY, *ACTIVE[: "das" in config]]) == 0
    metrics = _metrics(tmp_path)
    for key in keys:
        assert key in metrics, key


def test_learned_basis_is_checkpointed_and_audited_from_the_checkpoint(tmp_path):
    fit_dir, audit_dir = tmp_path / "fit", tmp_path / "audit"
    assert main(["fit", "-c", DAS, "--run-dir", str(fit_dir), *TINY, *ACTIVE]) == 0
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    saved = {k: v for k, v in state.items() if k.startswith("objective_modules.das.")}
    assert saved, "the learned basis must be in the checkpoint"

    runs.quiet_lightning()
    fresh = runs.build(load_config(DAS, TINY), audit_dir)
    initial = fresh.module.objective_modules["das"]().copy()
    summary = runs.audit_checkpoint(fresh, ckpt)
    loaded = fresh.module.objective_modules["das"]()
    assert not torch.allclose(initial["blocks.0.resid_post"], loaded["blocks.0.resid_post"])  # it trained
    live = fresh.audits[0].files.load("hypotheses/das.json").tensors["rotation/blocks.0.resid_post"]
    torch.testing.assert_close(live, loaded["blocks.0.resid_post"])  # the audit reads what the objective holds
    fitted = _metrics(fit_dir)
    for key, value in summary["metrics"].items():
        assert value == pytest.approx(fitted[key], abs=1e-6), key
    # the objective wrote the alignment and its rotation; another run's audit reads them by path
    written = Hypothesis.load(fit_dir / "hypotheses" / "das.json", kind="alignment")
    assert written.featurizer == "rotation" and written.alignment["left"]["dims"] == [0, 16]
    torch.testing.assert_close(written.tensors["rotation/blocks.0.resid_post"], loaded["blocks.0.resid_post"])
    elsewhere = load_config(DAS, [*TINY, f"audits.0.hypothesis={fit_dir / 'hypotheses' / 'das.json'}", "objectives=[]"])
    other = runs.build(elsewhere, tmp_path / "other")
    again = runs.audit_checkpoint(other, ckpt)
    assert again["metrics"]["audit/interchange/iia"] == pytest.approx(fitted["audit/interchange/iia"], abs=1e-6)
    # verify re-runs the alignment (in its rotation) on the checkpoint it was written with
    checked = verify(fit_dir / "hypotheses" / "das.json", ckpt)
    assert checked["kind"] == "alignment" and checked["same_weights"] and checked["same_data"] is None
    assert 0 <= checked["today"]["iia"] <= 1 and "control/random_subspace/iia" in checked["today"]
    assert "iia/left" in format_drift(checked)


def test_resume_with_a_learned_basis_continues_exactly(tmp_path):
    overrides = [*TINY, *ACTIVE, "trainer.max_steps=40", "trainer.checkpoint_every=20"]
    whole, split = fit_whole_and_resumed(DAS, overrides, tmp_path)
    w1 = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("objective_modules.") for k in w1)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], msg=key)
    assert read_jsonl(split / "audits.jsonl") == read_jsonl(whole / "audits.jsonl")


BAD = [
    (DAS, ["audits.0.hypothesis=hypotheses/nope.json"],
     "hypotheses/nope.json' does not exist and no objective of this run writes it", "hypotheses/das.json"),
    (DAS, ["objectives.0.subspace=rotated"], "unknown interchange subspace 'rotated'", "learned"),
    (DAS, ["audits.0.controls=[shuffle]"], "unknown interchange audit control 'shuffle'", "random_subspace"),
    (DAS, ["objectives.0.strict=[blocks.9.mlp.out]"], "unknown site 'blocks.9.mlp.out'", "blocks.1.mlp.out"),
    ("configs/quickstart.yaml", ["objectives.0.name=counterfactual_cot", "objectives.0.alignment=null"],
     "unknown argument of objective 'counterfactual_cot' 'alignment'", "fraction"),
    ("configs/cot-faithful.yaml", ["task={name: hierarchical_equality}"],
     "written reasoning steps", "valid: multistep_arithmetic"),
    ("configs/cot-faithful.yaml", ["audits.0.thresholds.follow=0.9"],
     "unknown metric of audit 'cot' 'follow'", "follow_rate"),
]  # fmt: skip


@pytest.mark.parametrize("config, overrides, message, valid", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, config, overrides, message, valid):
    assert_fit_fails_in_one_line(config, tmp_path, capsys, overrides, message, valid)


@pytest.mark.slow
def test_strict_term_makes_non_aligned_sites_irrelevant(tmp_path):
    """SIIT's claim, causally: resampling the non-aligned site (position 0 after block 0)
    changes the trained model's answer almost never with the strict term, and often without."""
    config = "tests/integration/assets/strict.yaml"
    changed = {}
    for weight in (1.0, 0.0):
        run_dir = tmp_path / f"w{weight}"
        assert main(["fit", "-c", config, "--run-dir", str(run_dir), f"objectives.0.strict_weight={weight}"]) == 0
        metrics = _metrics(run_dir)
        assert metrics["val/task_acc"] >= 0.95 and metrics["audit/interchange/iia"] >= 0.95
        changed[weight] = metrics["audit/interchange/strict_changed"]
    assert changed[1.0] <= 0.02
    assert changed[0.0] >= 0.15


@pytest.mark.slow
def test_counterfactual_cot_makes_answers_follow_the_steps(tmp_path):
    """With a cue that gives the answer away, plain training takes the shortcut (answers ignore
    corrupted steps); counterfactual CoT training makes the answers follow the steps."""
    config = "configs/cot-faithful.yaml"
    short = [
        "trainer.max_steps=600",
        "trainer.val_every=300",
        "trainer.progress_bar=false",
        "optim.decay=none",
        "audits.0.every_n_steps=300",
        "audits.0.n_examples=256",
        "data.val_size=256",
        "logger.wandb.mode=disabled",
    ]
    figures = {}
    for name, extra in (("objective", []), ("baseline", ["objectives=[]"])):
        assert main(["fit", "-c", config, "--run-dir", str(tmp_path / name), *short, *extra]) == 0
        figures[name] = _metrics(tmp_path / name)
    trained, baseline = figures["objective"], figures["baseline"]
    assert trained["audit/cot/clean_acc"] >= 0.95 and baseline["audit/cot/clean_acc"] >= 0.95
    assert trained["audit/cot/follow_rate"] >= 0.9 and trained["audit/cot/filler_acc"] <= 0.3
    assert baseline["audit/cot/follow_rate"] <= 0.2 and baseline["audit/cot/original_rate"] >= 0.8
    assert trained["audit/cot/early_aoc"] > baseline["audit/cot/early_aoc"] + 0.3
