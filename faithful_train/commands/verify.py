"""``faithful-train verify HYPOTHESIS --ckpt CKPT [-c CONFIG]``: test a saved hypothesis again.

The checkpoint's model is loaded (its run directory's config, or ``-c CONFIG``'s model), the
hypothesis's audit is rebuilt from the file (the same circuit, ablation, metric, audit-set size
and seed) and run on the config's task: the run's own task, or a shifted one that ``-c`` names.
Today's figures are printed beside the recorded ones, with the drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faithful_train.errors import ConfigError
from faithful_train.intervene.hypotheses import Hypothesis, data_hash, weights_hash


def verify(
    hypothesis: str | Path, ckpt: str | Path, config: str | Path | None = None, overrides: list[str] | tuple = ()
) -> dict[str, Any]:
    """Re-run ``hypothesis``'s tests on ``ckpt``: ``{recorded, today, same_weights, same_data, ...}``."""
    from faithful_train.commands.loading import load_weights
    from faithful_train.io.checkpoints import load_checkpoint
    from faithful_train.training.config import load_config

    found = Hypothesis.load(hypothesis)
    ckpt = Path(ckpt)
    state = load_checkpoint(ckpt)
    run_config = ckpt.resolve().parent.parent / "config.yaml"
    shifted = None if config is None else load_config(config, overrides)
    if run_config.is_file():  # the model as the checkpoint's run built it
        cfg, config_dir = load_config(run_config), run_config.parent
    elif shifted is not None:
        cfg, config_dir = shifted, Path(config).parent
    else:
        raise ConfigError(f"--ckpt {ckpt} is not inside a run directory (no {run_config}); name its config with -c")
    model = _model(cfg, config_dir)
    load_weights(model, state, ckpt)
    task = _model_task(cfg, config_dir) if shifted is None else _model_task(shifted, Path(config).parent)
    vocab = model.eval()(task.sample(1, 0)["input_ids"]).shape[-1]
    if vocab < task.vocab_size:
        raise ConfigError(
            f"task {task.name!r} has {task.vocab_size} tokens, more than the checkpoint's model ({vocab})"
        )
    audit = _audit(found, hypothesis)
    audit.bind(model, task, int(cfg.seed))
    today = audit.evaluate(model.eval(), task)
    return {
        "kind": found.kind,
        "hypothesis": str(hypothesis),
        "label": found.label,
        "recorded_step": found.step,
        "step": int(state.get("global_step", 0)),
        "task": task.name,
        "same_weights": weights_hash(model) == found.weights_hash,
        "same_data": None if found.data_hash is None else data_hash(audit.data(task)) == found.data_hash,
        "recorded": found.figures,
        "today": today,
    }


def format_drift(result: dict[str, Any], figures: tuple[str, ...] = ()) -> str:
    """A table: figure, recorded, today, drift (today - recorded)."""
    recorded, today = result["recorded"], result["today"]
    names = [n for n in figures if n in today] or sorted(today)
    width = max([len(n) for n in names] + [6])
    data = {True: "the same audit set", False: f"other data (task {result['task']}: shifted)"}.get(
        result["same_data"], f"task {result['task']} (no audit set recorded)"
    )
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


def _audit(found: Hypothesis, path: str | Path) -> Any:
    """The audit that tests ``found``: the edges audit for an edge circuit, the ablation audit for a
    circuit of nodes (its circuit, ablation and metric), the interchange audit for an alignment
    (in its rotation, if it has one)."""
    size = found.n_examples or 512
    if found.kind == "circuit" and found.edges:
        from faithful_train.audits.edges import EdgesAudit
        from faithful_train.functional.edges import ABLATIONS

        ablation = found.ablation if found.ablation in ABLATIONS else "mean"
        method = found.method or ("eap-ig-inputs" if ablation == "patch" else "eap-ig-activations")
        return EdgesAudit(
            hypothesis=str(path),
            label=found.label,
            n_examples=size,
            batch_size=size,
            seed=found.seed,
            ablation=ablation,
            method=method,
            metric=found.metric or "logit_diff",
        )
    if found.kind == "circuit":
        from faithful_train.audits.ablation import AblationAudit

        return AblationAudit(hypothesis=str(path), label=found.label, n_examples=size, seed=found.seed)
    from faithful_train.audits.interchange import InterchangeAudit

    rotation = str(Path(path).resolve()) if found.featurizer == "rotation" else None
    return InterchangeAudit(
        alignment=found.alignment, hypothesis=rotation, label=found.label, n_examples=size, seed=found.seed
    )


def _model(cfg: Any, config_dir: Path) -> Any:
    """The config's model, freshly built (weights loaded after)."""
    from faithful_train.modeling import build_model

    task = _model_task(cfg, config_dir)
    return build_model(cfg.model, task.vocab_size, task.seq_len, seed=int(cfg.seed), concepts=task.concepts)


def _model_task(cfg: Any, config_dir: Path) -> Any:
    from faithful_train.registry import TASKS, instantiate
    from faithful_train.tasks.base import Task
    from faithful_train.training.config import to_plain

    return instantiate("task", to_plain(cfg.task), TASKS, Task, config_dir)
