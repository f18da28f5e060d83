"""``faithful-train``: train a config, re-run its audits on a checkpoint, make and inspect data,
export a trained model.

    faithful-train fit   -c CONFIG [--run-dir DIR] [--resume | --resume-from CKPT] [--strict] [key=value ...]
    faithful-train audit -c CONFIG --ckpt PATH [--run-dir DIR] [--strict] [key=value ...]
    faithful-train data ioi --out DIR [--seed N]
    faithful-train data show -c CONFIG [-n N] [key=value ...]
    faithful-train export RUN_DIR --out DIR [--ckpt CKPT] [--merge]
    faithful-train verify HYPOTHESIS --ckpt CKPT [-c CONFIG] [key=value ...]
    faithful-train sweep -c SWEEP [--trials N] [--workers W] [--storage URL] [--out DIR] [key=value ...]
    faithful-train repro -c CONFIG [-c CONFIG2 ...] --seeds N [--workers W] [--out DIR] [--strict] [key=value ...]

Exit status: 0 done; 1 a pre-registered threshold failed under ``--strict`` (``repro``: in
any seed); 2 a user error
(unknown key, site, objective, audit, task, variable; wrong type; bad file), printed as one
line naming the bad value and the valid ones, with nothing written; 3 training diverged (a
non-finite loss, term or weight); 130 stopped by Ctrl-C (the message says how to resume).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from faithful_train.errors import FaithfulError, TrainingDiverged

VERIFY_FIGURES = {
    "circuit": (
        "faithfulness",
        "sufficiency",
        "necessity",
        "necessity_normalised",
        "full",
        "empty",
        "cpr",
        "cmd",
        "completeness",
        "task_acc",
    ),
    "alignment": (),  # every figure of the interchange audit
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faithful-train", description="Interpretability objectives and audits while training."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a config (objectives added to the loss, audits logged)")
    audit = sub.add_parser("audit", help="re-run a config's audits on a checkpoint")
    for p in (fit, audit):
        p.add_argument("-c", "--config", required=True, help="experiment YAML (see configs/)")
        p.add_argument("--run-dir", help="where to write the run (default: runs/<config>/<time>)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.max_steps=200")
        p.add_argument(
            "--strict",
            action="store_true",
            help="exit 1 when a pre-registered audit threshold fails (also: strict: true)",
        )
    fit.add_argument("--resume", action="store_true", help="resume from <run dir>/checkpoints/last.ckpt")
    fit.add_argument("--resume-from", metavar="CKPT", help="resume from this checkpoint")
    audit.add_argument("--ckpt", required=True, help="Lightning checkpoint to audit")
    verify = sub.add_parser(
        "verify", help="test a saved hypothesis on a checkpoint (and a shifted task): print the drift"
    )
    verify.add_argument("hypothesis", help="a hypothesis file (<run dir>/hypotheses/<label>.json)")
    verify.add_argument("--ckpt", required=True, help="the checkpoint to test it on")
    verify.add_argument(
        "-c",
        "--config",
        help="a config whose task (and model) to use, e.g. a shifted task (default: the checkpoint's run)",
    )
    verify.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of that config")
    data = sub.add_parser("data", help="make a testbed data set, or show a config's examples")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    ioi = data_sub.add_parser("ioi", help="write the IOI text testbed (train/val/audit.jsonl, text.txt, tokenizer/)")
    ioi.add_argument("--out", required=True, help="directory to write")
    ioi.add_argument("--seed", type=int, default=0)
    ioi.add_argument("--train", type=int, default=20000, help="training rows")
    arithmetic = data_sub.add_parser(
        "arithmetic",
        help="write multi-step arithmetic word problems with rationales and counterfactual steps "
        "(train/val/audit.jsonl, tokenizer/)",
    )
    arithmetic.add_argument("--out", required=True, help="directory to write")
    arithmetic.add_argument("--seed", type=int, default=0)
    arithmetic.add_argument("--train", type=int, default=20000, help="training rows")
    arithmetic.add_argument(
        "--hint", action="store_true", help="every prompt starts with its answer: a shortcut past the rationale"
    )
    show = data_sub.add_parser(
        "show", help="print a config's first examples as tokens, with spans and positions marked"
    )
    show.add_argument("-c", "--config", required=True)
    show.add_argument("-n", type=int, default=3, help="examples to show")
    show.add_argument("--split", choices=("train", "val", "audit"), default="train")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    export = sub.add_parser("export", help="write a run's model (and tokenizer) with save_pretrained")
    export.add_argument("run_dir", help="a run directory (config.yaml, checkpoints/last.ckpt)")
    export.add_argument("--out", required=True, help="directory to write")
    export.add_argument("--ckpt", help="checkpoint (default: <run dir>/checkpoints/last.ckpt)")
    export.add_argument(
        "--merge",
        action="store_true",
        help=(
            "a LoRA run: fold the adapters into the weights and write the merged model "
            "(default: the adapter, in peft's format)"
        ),
    )
    sweep = sub.add_parser(
        "sweep", help="a multi-objective Optuna sweep over config keys: Pareto front, hypervolume, pruning"
    )
    sweep.add_argument("-c", "--config", required=True, help="sweep YAML (see configs/sweeps/)")
    sweep.add_argument("--out", help="the sweep directory (default: runs/sweeps/<name>)")
    sweep.add_argument("--trials", type=int, help="trials to add (default: the grid's size, or 8)")
    sweep.add_argument("--workers", type=int, default=1, help="trials run side by side in processes here")
    sweep.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    sweep.add_argument(
        "--storage",
        help="an Optuna database URL shared by workers on many machines (default: SQLite in the sweep directory)",
    )
    sweep.add_argument(
        "--no-pruning", action="store_true", help="run every trial to the end (the sweep file's pruning off)"
    )
    sweep.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides for every trial, e.g. trainer.max_steps=200"
    )
    graph = sub.add_parser(
        "graph", help="build one attribution graph from a run's transcoders: writes its JSON (Neuronpedia) and PNG"
    )
    graph.add_argument("run_dir", help="the run directory")
    graph.add_argument("--prompt", required=True, help="the prompt (text, or a generated task's tokens by name)")
    graph.add_argument("--ckpt", help="the checkpoint (default <run dir>/checkpoints/last.ckpt)")
    graph.add_argument(
        "--transcoders", help="a folder of SAELens-layout transcoders, layer<i>/ (default: the run's saes/<label>/)"
    )
    graph.add_argument("--out", help="where to write <prompt>.json and .png (default <run dir>/graphs/on-demand)")
    graph.add_argument("--node-threshold", type=float, default=0.8, help="circuit-tracer's node pruning (0.8)")
    graph.add_argument("--edge-threshold", type=float, default=0.98, help="circuit-tracer's edge pruning (0.98)")
    graph.add_argument("--max-sources", type=int, default=1024, help="entries kept per adjacency row")
    graph.add_argument("--top-k", type=int, default=8, help="features whose claims are checked by intervention")
    repro = sub.add_parser(
        "repro", help="run configs over seeds 0..N-1: mean, sd, CI, threshold pass rates, paired differences"
    )
    repro.add_argument(
        "-c", "--config", action="append", required=True, help="experiment YAML; give two to compare them seed by seed"
    )
    repro.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per config (default 5)")
    repro.add_argument("--out", help="the repro directory (default: runs/repro/<config>+<config>)")
    repro.add_argument("--workers", type=int, default=1, help="runs side by side in processes here")
    repro.add_argument("--threads", type=int, default=1, help="torch threads per run")
    repro.add_argument("--storage", help="an Optuna database URL shared by workers on many machines")
    repro.add_argument(
        "--strict", action="store_true", help="exit 1 when a config's threshold passes in fewer than all seeds"
    )
    repro.add_argument(
        "--table",
        action="append",
        default=[],
        metavar="FILE",
        help="write the headline rows into FILE's <!-- repro:start --> ... <!-- repro:end --> table (README, results)",
    )
    repro.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (``fit -c X a=1 --run-dir D b=2``)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    loose = [item for item in extra if "=" in item and not item.startswith("-")]
    if len(loose) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(item for item in extra if item not in loose)}")
    if loose:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(loose)}")
        args.overrides = [*args.overrides, *loose]
    return args


def _run_dir(args: argparse.Namespace, cfg_run_dir: str | None) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if cfg_run_dir:
        return Path(cfg_run_dir)
    return Path("runs") / Path(args.config).stem / time.strftime("%Y%m%d-%H%M%S")


def _resume_path(args: argparse.Namespace, run_dir: Path) -> str | None:
    if not (args.resume or args.resume_from):
        return None
    if args.resume and args.resume_from:
        raise FaithfulError("give --resume or --resume-from, not both")
    path = Path(args.resume_from) if args.resume_from else run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FaithfulError(f"cannot resume: checkpoint {path} not found")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        from faithful_train.training import run as runs
        from faithful_train.training.config import load_config
        from faithful_train.training.rundir import check_run_dir, format_summary

        runs.quiet_lightning()
        if args.command == "data" and args.data_command == "ioi":
            from faithful_train.tasks.ioi import write_ioi

            written = write_ioi(args.out, seed=args.seed, n_train=args.train)
            print("\n".join(f"{name}: {path}" for name, path in written.items()))
            return 0
        if args.command == "data" and args.data_command == "arithmetic":
            from faithful_train.tasks.arithmetic_text import write_arithmetic

            written = write_arithmetic(args.out, seed=args.seed, n_train=args.train, hint=args.hint)
            print("\n".join(f"{name}: {path}" for name, path in written.items()))
            return 0
        if args.command == "export":
            from faithful_train.commands.export import export_run

            print(f"exported to {export_run(args.run_dir, args.out, args.ckpt, merge=args.merge)}")
            return 0
        if args.command == "graph":
            from faithful_train.commands.graph import build_graph, format_graph

            result = build_graph(
                args.run_dir,
                args.prompt,
                args.ckpt,
                args.transcoders,
                args.out,
                node_threshold=args.node_threshold,
                edge_threshold=args.edge_threshold,
                max_sources=args.max_sources,
                top_k=args.top_k,
            )
            print(format_graph(result), end="")
            return 0
        if args.command == "verify":
            from faithful_train.commands.verify import format_drift, verify

            result = verify(args.hypothesis, args.ckpt, args.config, args.overrides)
            print(format_drift(result, VERIFY_FIGURES[result["kind"]]))
            return 0
        if args.command == "sweep":
            from faithful_train.commands.sweep import format_front, run_sweep

            out = Path(args.out) if args.out else None
            summary = run_sweep(
                args.config,
                out,
                args.trials,
                args.workers,
                args.storage,
                args.threads,
                args.overrides,
                not args.no_pruning,
            )
            out = out or Path("runs") / "sweeps" / Path(args.config).stem
            print(format_front(out), end="")
            print(
                f"sweep directory: {out} ({summary['complete']} finished, {summary['pruned']} pruned, "
                f"{summary['fail']} failed)"
            )
            return 0
        if args.command == "repro":
            from faithful_train.commands.repro import TABLE_END, TABLE_START, format_repro, run_repro, update_table

            for table in args.table:  # checked before anything runs
                if TABLE_START not in (Path(table).read_text() if Path(table).is_file() else ""):
                    raise FaithfulError(f"--table {table}: no {TABLE_START} ... {TABLE_END} region to write into")

            command = shlex.join(["faithful-train", *(sys.argv[1:] if argv is None else argv)])
            result = run_repro(
                args.config,
                args.seeds,
                args.out,
                args.workers,
                args.storage,
                args.threads,
                args.overrides,
                command=command,
            )
            out = Path(args.out) if args.out else Path("runs") / "repro" / "+".join(result["configs"])
            for table in args.table:
                update_table(table, out)
            print(format_repro(out), end="")
            print(f"repro directory: {out}")
            if result["strict_failures"]:
                print("pre-registered thresholds not met in every seed: " + "; ".join(result["strict_failures"]))
                if args.strict:
                    return 1
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "data":
            from faithful_train.commands.show import show_examples

            print(show_examples(cfg, Path(args.config).parent, args.n, args.split))
            return 0
        run_dir = check_run_dir(_run_dir(args, cfg.run_dir))
        if getattr(args, "strict", False):
            cfg.strict = True  # recorded in config.yaml and preregistration.json
        if args.command == "fit":
            resume = _resume_path(args, run_dir)
            run = runs.build(cfg, run_dir, Path(args.config).parent)
            summary = runs.fit(run, resume)
            if summary is None:  # not rank zero
                return 0
        else:
            run = runs.build(cfg, run_dir, Path(args.config).parent)
            summary = runs.audit_checkpoint(run, args.ckpt)
    except TrainingDiverged as e:
        print(f"faithful-train: error: {e}", file=sys.stderr)
        return 3
    except FaithfulError as e:
        print(f"faithful-train: error: {e}", file=sys.stderr)
        return 2
    except runs.RunInterrupted as e:
        if e.checkpoint:
            where = (
                f"the last checkpoint is {e.checkpoint} (step {e.checkpoint_step}); "
                f"resume with: {_fit_command(args, run_dir, True)}"
            )
        else:
            where = f"no checkpoint was written yet; start again with: {_fit_command(args, run_dir, False)}"
        print(f"faithful-train: stopped at step {e.step}; {where}", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"run directory: {run_dir}")
    failed = {name: v for name, v in summary["thresholds"].items() if not v["pass"]}
    if failed:
        detail = "; ".join(f"{name} = {v['value']:.4g}, needs {v['threshold']}" for name, v in failed.items())
        print(f"pre-registered audit thresholds: FAIL ({detail})")
        if args.strict or cfg.strict:
            return 1
    elif summary["thresholds"]:
        print("pre-registered audit thresholds: PASS")
    return 0


def _fit_command(args: argparse.Namespace, run_dir: Path, resume: bool) -> str:
    """The command that continues (or restarts) this run: the same config, options and overrides."""
    options = ["--resume"] * resume + ["--strict"] * bool(args.strict)
    return shlex.join(
        ["faithful-train", "fit", "-c", args.config, "--run-dir", str(run_dir), *options, *args.overrides]
    )


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
