"""Recipe: the capability-transparency trade-off of concept bottlenecks, one table.

    python recipes/concepts_tradeoff.py [--out runs/concepts-tradeoff] [key=value ...]

Trains the same task and transformer four ways: no bottleneck (configs/concepts-baseline.yaml),
a hard bottleneck (configs/concepts-hard.yaml), a hybrid one with a penalised side channel
(configs/concepts-joint.yaml) and a concept embedding model (the joint config with
``model.bottleneck.mode=embedding``), then prints capability (task accuracy) beside
transparency (concept accuracy, task accuracy with every concept set to its true value, the
intervention curve's area, leakage) as a markdown table, also written to ``<out>/tradeoff.md``.
Overrides apply to every run, e.g. ``task.hidden_concept=true`` for a rule that needs an
unlabelled attribute (something to leak), or ``trainer.max_steps=500`` for a quick look.
"""

import sys
import time
from pathlib import Path

from faithful_train import run as runs
from faithful_train.config import load_config

VARIANTS = {
    "baseline (no bottleneck)": ("configs/concepts-baseline.yaml", []),
    "hard": ("configs/concepts-hard.yaml", []),
    "hybrid (joint)": ("configs/concepts-joint.yaml", []),
    "embedding (CEM)": ("configs/concepts-joint.yaml", ["model.bottleneck.mode=embedding", "objectives.0.leakage=0"]),
}
COLUMNS = [
    ("val task acc", "val/task_acc"),
    ("concept acc", "audit/concepts/concept_acc"),
    ("all concepts set", "audit/concepts/tti/{K}"),
    ("TTI area", "audit/concepts/tti_area"),
    ("leakage", "audit/concepts/leakage"),
]


def main(*args: str) -> str:
    runs.quiet_lightning()
    args = list(args)
    out = Path(args.pop(args.index("--out") + 1)) if "--out" in args else Path("runs/concepts-tradeoff")
    args = [a for a in args if a != "--out"]
    rows = []
    for name, (config, extra) in VARIANTS.items():
        run_dir = out / name.split()[0]
        cfg = load_config(config, [*extra, *args])
        started = time.perf_counter()
        summary = runs.fit(runs.build(cfg, run_dir, Path(config).parent))
        seconds = time.perf_counter() - started
        K = sum(1 for key in summary["metrics"] if key.startswith("audit/concepts/tti/"))  - 1
        cells = [summary["metrics"].get(key.format(K=K)) for _, key in COLUMNS]
        rows.append([name, *("—" if v is None else f"{v:.3f}" for v in cells), f"{seconds:.0f} s"])
    header = ["model", *(title for title, _ in COLUMNS), "train time"]
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in rows]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main(*sys.argv[1:])
