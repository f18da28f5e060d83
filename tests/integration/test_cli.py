"""The CLI on tiny versions of the shipped configs: run directory, errors, audit, resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from faithful_train.commands.cli import main
from faithful_train.io.files import read_jsonl
from faithful_train.training import run as runs
from faithful_train.training.config import load_config

QUICKSTART = "configs/quickstart.yaml"
TINY = [
    "trainer.max_steps=30",
    "trainer.val_every=10",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=10",
    "audits.0.n_examples=64",
    "data.val_size=64",
    "data.batch_size=32",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_fit_writes_the_run_directory(tmp_path, capsys):
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "audit/interchange/iia" in out and "val/task_acc" in out
    assert ("PASS" in out) != ("FAIL" in out)  # one verdict for the one threshold
    for name in ("config.yaml", "metrics.csv", "audits.jsonl", "summary.json", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    summary = _summary(tmp_path)
    metrics = summary["metrics"]
    for key in (
        "val/task_acc",
        "val/task_loss",
        "train/task_loss",
        "train/objective/interchange",
        "audit/interchange/iia",
        "audit/interchange/iia/left",
        "audit/interchange/iia/right",
    ):
        assert key in metrics, key
    assert summary["step"] == 30
    assert set(summary["thresholds"]) == {"audit/interchange/iia"}
    records = read_jsonl(tmp_path / "audits.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["metrics"]["iia"] == metrics["audit/interchange/iia"]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/objective/interchange") for r in rows)
    assert any(r.get("audit/interchange/iia") for r in rows)
    resolved = load_config(tmp_path / "config.yaml")
    assert resolved.trainer.max_steps == 30 and resolved.model.arch == "transformer"


BAD_INPUTS = [
    (["trainer.max_step=3"], "unknown config key 'trainer.max_step'", "max_steps"),
    (["seed=${nope}"], "Interpolation key 'nope' not found", "'seed'"),
    (["trainer.max_steps=abc"], "trainer.max_steps", "abc"),
    (["objectives.0.name=interchnage"], "unknown objective 'interchnage'", "interchange"),
    (["audits.0.name=nope"], "unknown audit 'nope'", "interchange"),
    (["task.name=equality"], "unknown task 'equality'", "hierarchical_equality"),
    (
        ["objectives.0.alignment.left.site=blocks.7.resid_post"],
        "unknown site 'blocks.7.resid_post'",
        "blocks.1.resid_post",
    ),
    (["audits.0.alignment.middle=blocks.0.resid_post"], "unknown variable", "left, right"),
    (["model=dense-huge"], "unknown model preset 'dense-huge'", "dense-tiny"),
    (["objectives.0.wieght=2"], "unknown argument of objective 'interchange' 'wieght'", "weight"),
    (["audits.0.thresholds.iaa=0.5"], "unknown metric of audit 'interchange'", "iia/left"),
    (["logger.wandb.mode=sometimes"], "logger.wandb.mode", "offline"),
    (["model.n_experts=-"], "model.n_experts", "-"),
    (["seed"], "key=value", "seed"),
    (["data.batch_size=0"], "data.batch_size", "0"),
    (["data.val_size=0"], "data.val_size", "0"),
    (["optim.lr=-1"], "optim.lr", "-1"),
    (["optim.betas=[2,3]"], "optim.betas", "[2.0, 3.0]"),
    (["trainer.devices=0"], "trainer.devices", "0"),
    (["trainer.precision=bogus"], "unknown trainer.precision 'bogus'", "bf16-mixed"),
    (["trainer.strategy=bogus"], "unknown trainer.strategy 'bogus'", "ddp"),
    (
        ["objectives.0.alignment.left.positions=[99]"],
        "position 99 is outside the task's sequence length 4",
        "objectives",
    ),
    (["objectives.0.weight=-1e-3"], "weight must be >= 0, got -0.001", "weight"),
    (
        ["objectives.0.alignment.left.positions=[-99]"],
        "position -99 is outside the task's sequence length 4",
        "objectives.0",
    ),
    (["audits.0.alignment.left.positions=[99]"], "position 99 is outside", "audits.0"),
    (["model.n_layers=0"], "model.n_layers must be >= 1, got 0", "n_layers"),
    (["model={arch: hf, path: {inputs}/nowhere}"], "is not a directory", "nowhere"),
    (["model={arch: hf, path: {inputs}/empty}"], "holds no config.json", "empty"),
    (["model={arch: hf, path: {inputs}/no_weights}"], "holds no loadable weights", "no_weights"),
    (["--run-dir", "{inputs}/a_file"], "is a file, not a directory", "a_file"),
    (["--run-dir", "{inputs}/a_file/run"], "cannot be made", "a_file"),
    (
        ["--resume-from", "{inputs}/a_file"],
        "is not a checkpoint that loads safely: not a file written by torch.save",
        "a_file",
    ),
    (["--resume-from", "{inputs}/none.ckpt"], "not found", "none.ckpt"),
    (["task.name=tests/integration/assets/helper_task/broken.py:Broken"], "broken.py line 3", "task"),
    (["optim.lr=${oc.env:FAITHFUL_TRAIN_UNSET_VARIABLE}"], "FAITHFUL_TRAIN_UNSET_VARIABLE' not found", "optim.lr"),
    (["trainer.on_nonfinite=ignore"], "unknown trainer.on_nonfinite 'ignore'", "skip"),
    (["optim.schedule_steps=0"], "optim.schedule_steps", "0"),
    (["audits=[{name: attribution, max_completeness_error: 0}]"], "max_completeness_error > 0", "audit"),
    (
        ["trainer.on_nonfinite=skip", "trainer.accumulate_grad_batches=2"],
        "needs one process and no gradient accumulation",
        "accumulate_grad_batches=2",
    ),
    (["trainer.on_nonfinite=skip", "trainer.devices=2"], "needs one process", "devices=2"),
    (["trainer.max_skipped_steps=0"], "trainer.max_skipped_steps' must be >= 1", "0"),
    (["audits=[{name: attribution, steps: 32, max_steps: 16}]"], "max_steps >= steps required", "16"),
    pytest.param(
        ["trainer.accelerator=gpu"],
        "trainer.accelerator' is 'gpu', but this machine has no CUDA device",
        "gpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
    ),
]


def _bad_input_files(root: Path) -> Path:
    """Files the bad inputs point at: a plain file, an empty folder, a model folder without weights."""
    root.mkdir(exist_ok=True)
    (root / "a_file").write_text("not a checkpoint\n")
    (root / "empty").mkdir(exist_ok=True)
    (root / "no_weights").mkdir(exist_ok=True)
    (root / "no_weights" / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2})
    )
    return root


def assert_fit_fails_in_one_line(config, run_dir, capsys, overrides, message, valid):
    """``fit`` exits 2 with one line that names the bad value and the valid ones, and writes
    nothing: not a run directory, nor anything in it. ``{inputs}`` in an argument stands for a
    folder of bad files (``_bad_input_files``)."""
    inputs = _bad_input_files(run_dir / "inputs")
    run = run_dir / "run"
    args = [item.replace("{inputs}", str(inputs)) for item in overrides]
    message, valid = message.replace("{inputs}", str(inputs)), valid.replace("{inputs}", str(inputs))
    assert main(["fit", "-c", config, "--run-dir", str(run), *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("faithful-train: error:"), err
    assert message in err and valid in err, err
    assert "Traceback" not in err
    assert not run.exists()


@pytest.mark.parametrize("overrides, message, valid", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message, valid):
    assert_fit_fails_in_one_line(QUICKSTART, tmp_path, capsys, overrides, message, valid)


def test_a_task_file_imports_a_module_beside_it(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            *TINY,
            "task={name: tests/integration/assets/helper_task/uses_helper.py:HelperTask}",
            "objectives=[]",
            "audits=[]",
        ],
    )
    run = runs.build(cfg, tmp_path)
    assert run.task.vocab_size == 8 and run.task.answer_tokens == tuple(range(8))


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "faithful_train.commands.cli", "fit", "-c", QUICKSTART, "trainer.max_step=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown config key 'trainer.max_step'" in proc.stderr


def test_a_missing_config_file_is_one_line(capsys):
    assert main(["fit", "-c", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert "config file not found" in err and err.count("\n") == 1


def test_audit_command_reproduces_the_final_audit(tmp_path):
    fit_dir, audit_dir = tmp_path / "fit", tmp_path / "audit"
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(fit_dir), *TINY]) == 0
    ckpt = fit_dir / "checkpoints" / "last.ckpt"
    assert main(["audit", "-c", QUICKSTART, "--ckpt", str(ckpt), "--run-dir", str(audit_dir), *TINY]) == 0
    fitted, audited = _summary(fit_dir)["metrics"], _summary(audit_dir)["metrics"]
    for key, value in audited.items():
        assert value == pytest.approx(fitted[key], abs=1e-6), key
    assert _summary(audit_dir)["step"] == 30
    assert main(["audit", "-c", QUICKSTART, "--ckpt", str(tmp_path / "none.ckpt"), *TINY]) == 2


def _csv_rows(run_dir: Path) -> set[tuple]:
    with open(run_dir / "metrics.csv") as f:
        return {tuple(sorted((k, v) for k, v in row.items() if v)) for row in csv.DictReader(f)}


class StopAt(Callback):
    """Stops training after ``step`` optimizer steps, as a user interrupting a run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def fit_whole_and_resumed(config: str, overrides: list[str], tmp_path: Path, stop: int = 20) -> tuple[Path, Path]:
    """The same run twice: uninterrupted (``whole``), and stopped after ``stop`` steps then
    resumed from its checkpoint (``split``). Returns both run directories."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["fit", "-c", config, "--run-dir", str(whole), *overrides]) == 0
    runs.quiet_lightning()
    runs.fit(runs.build(load_config(config, overrides), split), extra_callbacks=[StopAt(stop)])
    assert torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop
    assert main(["fit", "-c", config, "--run-dir", str(split), "--resume", *overrides]) == 0
    return whole, split


def test_resume_continues_exactly(tmp_path):
    overrides = [*TINY, "trainer.max_steps=40", "trainer.checkpoint_every=20"]
    whole, split = fit_whole_and_resumed(QUICKSTART, overrides, tmp_path)

    a, b = _summary(whole), _summary(split)
    assert a["step"] == b["step"] == 40
    assert a["metrics"].keys() == b["metrics"].keys()
    for key in a["metrics"]:
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), key
    assert [r["step"] for r in read_jsonl(split / "audits.jsonl")] == [10, 20, 30, 40]
    assert read_jsonl(split / "audits.jsonl") == read_jsonl(whole / "audits.jsonl")
    # metrics.csv is continued, not restarted: every row of the uninterrupted run is there, and
    # the only extra one is the validation the stopped run ran when it stopped
    rows_whole, rows_split = _csv_rows(whole), _csv_rows(split)
    assert rows_whole <= rows_split
    for row in map(dict, rows_split - rows_whole):
        assert row["step"] == "20" and set(row) <= {"step", "epoch", "val/task_acc", "val/task_loss"}, row
    w1 = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], msg=key)


def test_audits_do_not_change_training(tmp_path):
    """Same seed with and without the audit: identical weights (audits touch no RNG, no data)."""
    runs.quiet_lightning()
    weights = []
    for name, audits in (("with", None), ("without", "[]")):
        overrides = [*TINY, "trainer.max_steps=15"] + ([f"audits={audits}"] if audits else [])
        cfg = load_config(QUICKSTART, overrides)
        run = runs.build(cfg, tmp_path / name)
        runs.fit(run)
        weights.append({k: v.clone() for k, v in run.module.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], msg=key)


def test_wandb_offline_by_default_does_not_hang(tmp_path):
    """Offline by default; and two runs in one process (a recipe) get a wandb run each: wandb
    keeps one run per process, so each fit closes its own (the second once logged into the first)."""
    overrides = [o for o in TINY if not o.startswith("logger.wandb")] + [
        "trainer.max_steps=5",
        "audits.0.every_n_steps=5",
    ]
    for name in ("first", "second"):
        assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / name), *overrides]) == 0
        offline_runs = list((tmp_path / name / "wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1, (name, list((tmp_path / name).iterdir()))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "mixtral-tiny"])
def test_hugging_face_model_from_a_preset(tmp_path, preset):
    overrides = [*TINY, f"model={preset}", "trainer.max_steps=6", "audits.0.every_n_steps=3"]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path), *overrides]) == 0
    summary = _summary(tmp_path)
    assert "audit/interchange/iia" in summary["metrics"] and summary["step"] == 6


def test_overrides_go_anywhere_and_read_numbers_as_a_yaml_file_does(tmp_path):
    from faithful_train.commands.cli import _parse

    args = _parse(["fit", "-c", QUICKSTART, "a=1", "--run-dir", str(tmp_path), "b=2"])
    assert args.overrides == ["a=1", "b=2"] and args.run_dir == str(tmp_path)
    cfg = load_config(QUICKSTART, ["objectives.0.weight=1e-3", "optim.lr=1e30"])
    assert cfg.objectives[0].weight == 1e-3 and cfg.optim.lr == 1e30


def test_resume_and_resume_from_together_is_one_line(tmp_path, capsys):
    assert (
        main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path), "--resume", "--resume-from", "x.ckpt", *TINY]) == 2
    )
    assert "--resume or --resume-from, not both" in capsys.readouterr().err


def test_a_checkpoint_that_would_run_code_is_refused_by_resume_and_audit(tmp_path, capsys):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {}, "global_step": Payload()}))
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "run"), "--resume-from", str(evil), *TINY]) == 2
    assert main(["audit", "-c", QUICKSTART, "--ckpt", str(evil), "--run-dir", str(tmp_path / "audit"), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("not a checkpoint that loads safely") == 2 and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
