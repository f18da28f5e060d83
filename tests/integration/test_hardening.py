"""What a run does when things go wrong: divergence, Ctrl-C, kills during a log write,
pre-registered thresholds that fail, secrets in configs, and the permissions of what it writes."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import _parse, main
from faithful_train.io.checkpoints import load_checkpoint
from faithful_train.io.files import atomic_write_text
from faithful_train.training.config import load_config, written
from faithful_train.training.metrics_csv import RunCSVLogger
from tests.integration.test_cli import QUICKSTART, TINY

NAN_AT = "tests/integration/assets/nan_objective.py:NanAt"


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def _finite(ckpt: Path) -> bool:
    state = load_checkpoint(ckpt)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# --- divergence ---


def test_a_diverging_run_stops_names_the_term_and_keeps_no_nonfinite_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), *TINY, "optim.lr=1e6", "trainer.checkpoint_every=1"])
        == 3
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training diverged:" in err and " at step " in err, err
    assert "train/" in err or "non-finite weights" in err, err
    assert not (run_dir / "summary.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert not last.exists() or _finite(last)


def test_a_nonfinite_term_at_a_known_step_stops_the_run_there(tmp_path, capsys):
    run_dir = tmp_path / "run"
    planted = [f"objectives=[{{name: '{NAN_AT}', at: 5}}]", "audits=[]", "trainer.checkpoint_every=2"]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), *TINY, *planted]) == 3
    err = capsys.readouterr().err
    assert "train/objective/nan_at is nan at step 5" in err and "(step 4)" in err, err
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4


def test_skip_leaves_out_the_nonfinite_update_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    planted = [f"objectives=[{{name: '{NAN_AT}', at: 5}}]", "audits=[]", "trainer.on_nonfinite=skip"]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), *TINY, *planted]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["train/skipped_steps"] == 1.0 and summary["step"] == 30
    assert _finite(run_dir / "checkpoints" / "last.ckpt")


def test_a_nonfinite_gradient_from_a_finite_loss_stops_or_is_skipped(tmp_path, capsys):
    planted = [f"objectives=[{{name: '{NAN_AT}', at: 5, gradient: true}}]", "audits=[]"]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "stop"), *TINY, *planted]) == 3
    assert "the gradient is non-finite at step 5" in capsys.readouterr().err
    assert (
        main(
            ["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "skip"), *TINY, *planted, "trainer.on_nonfinite=skip"]
        )
        == 0
    )
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["metrics"]["train/skipped_steps"] == 1.0 and _finite(tmp_path / "skip" / "checkpoints" / "last.ckpt")


def test_skip_gives_up_after_too_many_nonfinite_steps_in_a_row(tmp_path, capsys):
    overrides = ["optim.lr=1e6", "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=3", "audits=[]"]
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "run"), *TINY, *overrides]) == 3
    assert "4th non-finite step in a row (trainer.max_skipped_steps=3)" in capsys.readouterr().err


def test_a_nonfinite_checkpoint_is_refused_by_audit(tmp_path, capsys):
    run_dir = tmp_path / "fit"
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), *TINY, "trainer.max_steps=2", "audits=[]"]) == 0
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    name = next(k for k in state["state_dict"] if k.startswith("model."))
    state["state_dict"][name] = torch.full_like(state["state_dict"][name], float("nan"))
    torch.save(state, tmp_path / "nan.ckpt")
    assert (
        main(["audit", "-c", QUICKSTART, "--ckpt", str(tmp_path / "nan.ckpt"), "--run-dir", str(tmp_path / "a"), *TINY])
        == 2
    )
    assert "holds non-finite weights" in capsys.readouterr().err
    assert main(["audit", "-c", QUICKSTART, "--ckpt", str(tmp_path / "nan.ckpt").replace("nan", "none"), *TINY]) == 2
    (tmp_path / "text.ckpt").write_text("hello\n")
    assert (
        main(
            ["audit", "-c", QUICKSTART, "--ckpt", str(tmp_path / "text.ckpt"), "--run-dir", str(tmp_path / "b"), *TINY]
        )
        == 2
    )
    assert "not a file written by torch.save" in capsys.readouterr().err


# --- pre-registered thresholds ---


def test_strict_fails_the_run_on_a_failed_threshold_and_the_thresholds_are_preregistered(tmp_path, capsys):
    run_dir = tmp_path / "fit"
    impossible = "audits.0.thresholds={iia: '>= 1.01'}"
    old_umask = os.umask(0o022)
    try:
        assert main(["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), *TINY, impossible]) == 0  # not strict
    finally:
        os.umask(old_umask)
    out = capsys.readouterr().out
    assert "pre-registered audit thresholds: FAIL (audit/interchange/iia = " in out and "needs >= 1.01" in out
    prereg = json.loads((run_dir / "preregistration.json").read_text())
    assert prereg["thresholds"] == {"audit/interchange/iia": ">= 1.01"} and prereg["strict"] is False
    assert prereg["config_sha256"] == hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest()
    for name in ("config.yaml", "summary.json", "preregistration.json", "audits.jsonl", "metrics.csv"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name  # the umask's mode, not mkstemp's 0600

    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    audit = ["audit", "-c", QUICKSTART, "--ckpt", ckpt, *TINY]
    assert main([*audit, "--run-dir", str(tmp_path / "a1"), impossible, "--strict"]) == 1
    assert main([*audit, "--run-dir", str(tmp_path / "a2"), impossible, "strict=true"]) == 1
    assert main([*audit, "--run-dir", str(tmp_path / "a3"), "audits.0.thresholds={iia: '>= 0'}", "--strict"]) == 0
    assert "pre-registered audit thresholds: PASS" in capsys.readouterr().out
    # a resumed run keeps its pre-registration: other thresholds are refused before anything runs
    resume = ["fit", "-c", QUICKSTART, "--run-dir", str(run_dir), "--resume", *TINY]
    assert main([*resume, "audits.0.thresholds={iia: '>= 0.5'}"]) == 2
    assert "differ from those pre-registered" in capsys.readouterr().err
    # nor can an audit written into the run's directory replace it
    assert main([*audit, "--run-dir", str(run_dir), "audits.0.thresholds={iia: '>= 0.5'}"]) == 2
    assert "differ from those pre-registered" in capsys.readouterr().err
    assert json.loads((run_dir / "preregistration.json").read_text()) == prereg
    # --strict is recorded
    assert main([*audit, "--run-dir", str(tmp_path / "a4"), impossible, "--strict"]) == 1
    assert json.loads((tmp_path / "a4" / "preregistration.json").read_text())["strict"] is True


# --- Ctrl-C ---


def test_ctrl_c_says_where_the_checkpoint_is_how_to_resume_and_exits_130(tmp_path, repo):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_steps=100000", "trainer.val_every=5", "trainer.checkpoint_every=5", "audits=[]"]
    cmd = [
        sys.executable,
        "-m",
        "faithful_train.commands.cli",
        "fit",
        "-c",
        QUICKSTART,
        "--run-dir",
        str(run_dir),
        "--strict",
        *overrides,
    ]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a run that ignored the signal must not outlive the test
    assert proc.returncode == 130, err
    line = next(line for line in err.splitlines() if line.startswith("faithful-train: stopped at step"))
    assert f"the last checkpoint is {run_dir / 'checkpoints' / 'last.ckpt'} (step " in line
    command = line.split("resume with: ", 1)[1]
    args = _parse(shlex.split(command)[1:])
    assert (
        args.resume
        and args.strict
        and args.run_dir == str(run_dir)
        and args.config == QUICKSTART
        and args.overrides == overrides
    )
    assert "Traceback" not in err


# --- secrets and schedules ---


def test_values_from_the_environment_are_written_as_references(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_TEST_SECRET_LR", "0.0012345")
    cfg = load_config(QUICKSTART, [*TINY, "optim.lr=${oc.env:FT_TEST_SECRET_LR}", "trainer.max_steps=2", "audits=[]"])
    assert cfg.optim.lr == pytest.approx(0.0012345)  # used as the value
    assert written(cfg)["optim"]["lr"] == "${oc.env:FT_TEST_SECRET_LR}"  # what wandb's config receives
    assert (
        main(
            [
                "fit",
                "-c",
                QUICKSTART,
                "--run-dir",
                str(tmp_path),
                *TINY,
                "optim.lr=${oc.env:FT_TEST_SECRET_LR}",
                "trainer.max_steps=2",
                "audits=[]",
            ]
        )
        == 0
    )
    text = (tmp_path / "config.yaml").read_text()
    assert "${oc.env:FT_TEST_SECRET_LR}" in text and "0.0012345" not in text
    assert load_config(tmp_path / "config.yaml").optim.lr == pytest.approx(0.0012345)  # reads back


def test_a_resume_with_more_steps_keeps_the_decay_schedule_unless_asked(capsys):
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
    from faithful_train.training.config import OptimSection, TrainerSection
    from faithful_train.training.module import FaithfulModule
    from tests.conftest import tiny_transformer

    def module(
        total: int, keep: bool
    ) -> FaithfulModule:  # keep: the schedule follows trainer.max_steps of the first start
        optim = OptimSection(decay="cosine", schedule_steps=None if keep else total)
        return FaithfulModule(
            tiny_transformer(), HierarchicalEquality(), optim, trainer=TrainerSection(max_steps=total)
        )

    saved: dict = {}
    module(300, keep=True).on_save_checkpoint(saved)
    resumed = module(600, keep=True)
    resumed.on_load_checkpoint(saved)
    assert resumed.total_steps == 300 and resumed.lr_factor(450) == pytest.approx(0.1)
    assert "the cosine schedule keeps its 300 steps" in capsys.readouterr().err
    stretched = module(600, keep=False)  # optim.schedule_steps given
    stretched.on_load_checkpoint(saved)
    assert stretched.total_steps == 600


# --- logs that survive ---


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_csv_survives_a_kill_while_its_header_is_rewritten(tmp_path, monkeypatch):
    logger = RunCSVLogger(tmp_path)
    for step in range(5):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()
    assert len(_rows(tmp_path / "metrics.csv")) == 5

    def killed(*args):  # the process dies after writing the new file, before it replaces the old
        raise KeyboardInterrupt

    logger.log_metrics({"train/loss": 5.0, "val/task_acc": 0.5}, step=5)  # a new metric: a new header
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    monkeypatch.undo()
    assert (tmp_path / "metrics.csv").read_text() == before  # whole, as it was
    assert not list(tmp_path.glob(".metrics.csv.*"))  # no temporary file left behind
    logger.save()  # what Lightning's finalize does after the interrupt: the new header, then the row
    rows = _rows(tmp_path / "metrics.csv")
    assert len(rows) == 6 and rows[-1]["val/task_acc"] == "0.5" and all(None not in row for row in rows)
    resumed = RunCSVLogger(tmp_path, resume_step=6)  # and it reads back on resume
    _ = resumed.experiment  # the property opens the file and reads it back
    assert len(_rows(tmp_path / "metrics.csv")) == 6


def test_metrics_csv_appends_whole_rows_and_widens_its_header(tmp_path):
    logger = RunCSVLogger(tmp_path)
    logger.log_metrics({"a": 1.0}, step=0)
    logger.save()
    logger.log_metrics({"a": 2.0}, step=1)
    logger.save()
    logger.log_metrics({"a": 3.0, "b": 4.0}, step=2)
    logger.save()
    rows = _rows(tmp_path / "metrics.csv")
    assert [r["a"] for r in rows] == ["1.0", "2.0", "3.0"] and rows[-1]["b"] == "4.0" and rows[0]["b"] == ""
    assert logger.experiment.rows_written == 3


def test_a_resume_says_when_metrics_csv_lost_rows(tmp_path, capsys):
    header = "step,train/loss\n"
    atomic_write_text(tmp_path / "metrics.csv", header + "".join(f"{s},{s}.0\n" for s in range(11)))
    logger = RunCSVLogger(tmp_path, resume_step=24, expected_rows=25)
    _ = logger.experiment  # opens the file: keeps rows <= 24, compares with the checkpoint's count
    err = capsys.readouterr().err
    assert "holds 11 rows up to step 24, the checkpoint recorded 25" in err
    intact = RunCSVLogger(tmp_path, resume_step=10, expected_rows=11)
    _ = intact.experiment
    assert "rows were lost" not in capsys.readouterr().err
    assert len(_rows(tmp_path / "metrics.csv")) == 11


def test_the_checkpoint_records_how_many_metrics_rows_it_covers(tmp_path):
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path), *TINY, "trainer.max_steps=20", "audits=[]"]) == 0
    rows = _rows(tmp_path / "metrics.csv")
    recorded = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["metrics_csv_rows"]
    assert 0 < recorded <= len([r for r in rows if int(r["step"]) <= 20])
    # and the run's trained model, from Python
    import faithful_train

    model, task = faithful_train.load_run(tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    for name, tensor in faithful_train.load_model(tmp_path).state_dict().items():
        torch.testing.assert_close(tensor, state[f"model.{name}"], msg=name)
    assert task.name == "hierarchical_equality" and not faithful_train.load_model(tmp_path).training
    # a run logged to wandb online loads on a machine without a network
    config = tmp_path / "config.yaml"
    config.write_text(config.read_text().replace("mode: disabled", "mode: online"))
    assert "mode: online" in config.read_text()
    faithful_train.load_model(tmp_path)


# --- what the terminal shows ---


def test_the_progress_bar_counts_steps_not_epochs_of_an_endless_stream():
    from faithful_train.training.run import _progress_bars

    cfg = load_config(QUICKSTART)
    (bar,) = _progress_bars(cfg)
    assert bar._get_train_description(0).strip() == "train"
    assert _progress_bars(load_config(QUICKSTART, ["trainer.progress_bar=false"])) == []


# --- wandb online without a network ---


@pytest.mark.parametrize(
    "key, url, message",
    [
        (None, None, "needs a wandb API key (WANDB_API_KEY or `wandb login`)"),
        ("0123456789abcdef", "http://127.0.0.1:9", "the wandb server http://127.0.0.1:9 cannot be reached"),
    ],
)
def test_wandb_online_without_a_key_or_a_server_is_one_line(tmp_path, capsys, monkeypatch, key, url, message):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", key)
    if url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
    overrides = [o for o in TINY if not o.startswith("logger.wandb")] + ["logger.wandb.mode=online"]
    started = time.time()
    assert main(["fit", "-c", QUICKSTART, "--run-dir", str(tmp_path / "run"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "logger.wandb.mode=offline" in err, err
    assert time.time() - started < 60 and not (tmp_path / "run").exists()


def test_a_resume_drops_the_rows_the_resumed_run_logs_again(tmp_path):
    """A killed run may have flushed the training row of the step after its checkpoint (stamped
    with the checkpoint's step): the resumed run logs that step again, so the row goes; the
    validation and audit rows at that step stay (they are not run again)."""
    rows = "step,train/loss,val/task_acc,audit/x/iia\n" + "".join(f"{s},{s}.0,,\n" for s in range(20))
    rows += "20,,0.5,\n20,,,0.7\n20,20.0,,\n21,21.0,,\n"  # val and audit at 20; the next steps' training rows
    atomic_write_text(tmp_path / "metrics.csv", rows)
    logger = RunCSVLogger(tmp_path, resume_step=20, expected_rows=21)
    _ = logger.experiment
    kept = _rows(tmp_path / "metrics.csv")
    assert [r["step"] for r in kept[-3:]] == ["19", "20", "20"] and len(kept) == 22
    assert kept[-2]["val/task_acc"] == "0.5" and kept[-1]["audit/x/iia"] == "0.7"
