"""Recipe: train a model with interventional objectives from a config, then re-audit the
final checkpoint, from Python (what ``faithful-train fit`` and ``faithful-train audit`` do).

    python recipes/pretrain_and_audit.py configs/quickstart.yaml [key=value ...]

Read top to bottom; copy and change.
"""

import sys
from pathlib import Path

from faithful_train.training import run as runs
from faithful_train.training.config import load_config
from faithful_train.training.rundir import format_summary


def main(config: str, *overrides: str) -> None:
    runs.quiet_lightning()
    cfg = load_config(config, list(overrides))  # YAML + model preset + overrides, validated
    run_dir = Path(cfg.run_dir or f"runs/recipe-{Path(config).stem}")

    # 1. Train: the task loss plus each objective's weighted term; audits every N steps.
    run = runs.build(cfg, run_dir, Path(config).parent)
    summary = runs.fit(run)
    print(format_summary(summary))

    # 2. Re-audit the final checkpoint with a fresh copy of the run (same config, new weights
    #    loaded from disk): the figures must match the last in-training audit.
    again = runs.build(cfg, run_dir / "re-audit", Path(config).parent)
    audited = runs.audit_checkpoint(again, run_dir / "checkpoints" / "last.ckpt")
    for name, value in audited["metrics"].items():
        print(f"{name}: in training {summary['metrics'][name]:.4f}, from checkpoint {value:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
