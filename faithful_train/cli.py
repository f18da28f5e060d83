"""``faithful-train``: train a config, or re-run its audits on a checkpoint.

    faithful-train fit   -c CONFIG [--run-dir DIR] [--resume | --resume-from CKPT] [key=value ...]
    faithful-train audit -c CONFIG --ckpt PATH [--run-dir DIR] [key=value ...]

A user error (unknown key, site, objective, audit, task, variable; wrong type) prints one
line naming the bad value and the valid ones, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from faithful_train.errors import FaithfulError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faithful-train", description="Interpretability objectives and audits while training.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a config (objectives added to the loss, audits logged)")
    audit = sub.add_parser("audit", help="re-run a config's audits on a checkpoint")
    for p in (fit, audit):
        p.add_argument("-c", "--config", required=True, help="experiment YAML (see configs/)")
        p.add_argument("--run-dir", help="where to write the run (default: runs/<config>/<time>)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=200")
    fit.add_argument("--resume", action="store_true", help="resume from <run dir>/checkpoints/last.ckpt")
    fit.add_argument("--resume-from", metavar="CKPT", help="resume from this checkpoint")
    audit.add_argument("--ckpt", required=True, help="Lightning checkpoint to audit")
    return parser


def _run_dir(args: argparse.Namespace, cfg_run_dir: str | None) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if cfg_run_dir:
        return Path(cfg_run_dir)
    return Path("runs") / Path(args.config).stem / time.strftime("%Y%m%d-%H%M%S")


def _resume_path(args: argparse.Namespace, run_dir: Path) -> str | None:
    if not (args.resume or args.resume_from):
        return None
    path = Path(args.resume_from) if args.resume_from else run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FaithfulError(f"cannot resume: checkpoint {path} not found")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from faithful_train import run as runs
        from faithful_train.config import load_config
        from faithful_train.rundir import format_summary

        runs.quiet_lightning()
        cfg = load_config(args.config, args.overrides)
        run_dir = _run_dir(args, cfg.run_dir)
        if args.command == "fit":
            resume = _resume_path(args, run_dir)
            run = runs.build(cfg, run_dir, Path(args.config).parent)
            summary = runs.fit(run, resume)
            if summary is None:
                return 130 if run.module._trainer and run.module.trainer.interrupted else 0
        else:
            run = runs.build(cfg, run_dir, Path(args.config).parent)
            summary = runs.audit_checkpoint(run, args.ckpt)
    except FaithfulError as e:
        print(f"faithful-train: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    if summary["thresholds"] and not summary["passed"]:
        print("pre-registered audit thresholds: FAIL")
    return 0


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
