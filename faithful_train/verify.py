"""``faithful-train verify HYPOTHESIS --ckpt CKPT [-c CONFIG]``: test a saved hypothesis again.

The checkpoint's model is loaded (its run directory's config, or ``-c CONFIG``'s model), the
hypothesis's audit is rebuilt from the file (the same circuit, ablation, metric, audit-set size
and seed) and run on the config's task: the run's own task, or a shifted one that ``-c`` names.
Today's figures are printed beside the recorded ones, with the drift.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError
from faithful_train.hypotheses import Hypothesis, data_hash, weights_hash


def verify(hypothesis: str | Path, ckpt: str | Path, config: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict[str, Any]:
    """Re-run ``hypothesis``'s tests on ``ckpt``: ``{recorded, today, same_weights, same_data, ...}``."""
    from faithful_train import run as runs
    from faithful_train.audits.ablation import AblationAudit
    from faithful_train.config import load_config
    from faithful_train.loading import load_weights
    from faithful_train.rundir import load_checkpoint

    found = Hypothesis.load(hypothesis)
    if found.kind != "circuit":
        raise ConfigError(f"hypothesis {hypothesis}: verify tests circuits; an {found.kind} is tested by the interchange audit")
    ckpt = Path(ckpt)
    state = load_checkpoint(ckpt)
    if config is None:
        run_config = ckpt.resolve().parent.parent / "config.yaml"
        if not run_config.is_file():
            raise ConfigError(f"--ckpt {ckpt} is not inside a run directory (no {run_config}); name its config with -c")
        cfg, config_dir = load_config(run_config, overrides), run_config.parent
    else:
        cfg, config_dir = load_config(config, overrides), Path(config).parent
    cfg.objectives, cfg.audits = [], []  # only the model and the task
    cfg.logger.wandb.mode = "disabled"
    with tempfile.TemporaryDirectory() as scratch:
        run = runs.build(cfg, scratch, config_dir)
    model, task = run.module.model, run.task
    load_weights(model, state)
    audit = AblationAudit(hypothesis=str(hypothesis), label=found.label, n_examples=found.n_examples or 512, seed=found.seed)
    audit.bind(model, task, cfg.seed)
    today = audit.evaluate(model.eval(), task)
    return {
        "hypothesis": str(hypothesis),
        "label": found.label,
        "recorded_step": found.step,
        "step": int(state.get("global_step", 0)),
        "task": task.name,
        "same_weights": weights_hash(model) == found.weights_hash,
        "same_data": data_hash(audit.data(task)) == found.data_hash,
        "recorded": found.figures,
        "today": today,
    }


def format_drift(result: dict[str, Any], figures: tuple[str, ...] = ()) -> str:
    """A table: figure, recorded, today, drift (today - recorded)."""
    recorded, today = result["recorded"], result["today"]
    names = [n for n in (figures or today) if n in today]
    width = max([len(n) for n in names] + [6])
    data = "the same audit set" if result["same_data"] else f"other data (task {result['task']}: shifted)"
    weights = "the same weights" if result["same_weights"] else f"other weights (step {result['step']})"
    lines = [
        f"hypothesis {result['label']} (recorded at step {result['recorded_step']}), tested on {weights} and {data}",
        f"{'figure':<{width}}  {'recorded':>10}  {'today':>10}  {'drift':>10}",
    ]
    for name in names:
        before = recorded.get(name)
        now = today[name]
        drift = "" if before is None else f"{now - before:+10.4f}"
        lines.append(f"{name:<{width}}  {'' if before is None else f'{before:10.4f}':>10}  {now:10.4f}  {drift:>10}")
    return "\n".join(lines)
