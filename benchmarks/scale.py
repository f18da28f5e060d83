"""Training steps at real scale: seconds and peak memory per step of every objective on a
GPT-2-small-shaped model and a 1B llama, with and without activation checkpointing, in fp32 and
bf16, full fine-tuning and LoRA.

    make benchmarks           # or: .venv/bin/python benchmarks/scale.py [--models gpt2-124m llama-1b] [--json OUT]

Models: random weights of the real shapes, written with ``save_pretrained`` on the fly and loaded
as a user loads a checkpoint (``model.path``): ``gpt2-124m`` (12 layers x 768, vocabulary 50257)
and ``llama-1b`` (TinyLlama's shape: 22 layers x 2048, 32 heads, 4 key/value heads, MLP 5632,
vocabulary 32000; 1.1B parameters). Full fine-tuning with AdamW of the 1B model does not fit in
24 GB, so it runs with LoRA only.

Data: ``KeyCopy`` (below), batches of 8 sequences of 128 tokens whose answer is the token at
position 1: a variable (``key``) the interchange objectives align at the middle block, at that
position.

Runs, each a real ``faithful-train`` run (``run.build`` and Lightning's loop, no audits, no
validation, no checkpoints) in a process of its own, timed from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, every term, backward, optimizer step): the median of the
measured steps after the warm-up ones, and of that over ``--rounds`` interleaved rounds, so a
drift in the machine's speed hits every configuration alike (ratios are taken within a round).
Memory, two figures: ``peak`` is the process's peak (its resident set's high-water mark, VmHWM,
on a CPU; ``torch.cuda.max_memory_allocated`` on a GPU) over the measured steps, weights and
optimizer state included; ``step`` is what a step adds on top of the memory it starts with (the
peak less the resident set or allocation at the step's start, freed memory returned to the
system first with ``malloc_trim``): activations, gradients, the objectives' extra forwards.
Activation checkpointing acts on the second.

- ``plain``: the task loss alone.
- ``interchange``: IIT on ``key`` in half the residual stream after the middle block.
- ``das``: the same with a learned 64-dimensional rotation.
- ``preserve``: KL to the starting model on every token (a frozen copy; with LoRA the base with
  its adapters off).
- ``circuit``: the circuit objective (half the heads of every block and every MLP; the rest
  mean-ablated).
- ``sae``: a TopK SAE (8 x width latents, k = 32) on the middle block's output.
- ``lora``, ``lora+interchange``, ``lora+preserve``: LoRA (r = 16) on the attention's query and
  value projections (``c_attn`` for GPT-2) and the MLP's down projection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faithful_train.tasks.base import Batch, Task  # noqa: E402

HERE = Path(__file__).resolve()
MODELS: dict[str, dict[str, Any]] = {
    "gpt2-124m": {
        "family": "gpt2",
        "config": dict(
            n_embd=768,
            n_layer=12,
            n_head=12,
            n_positions=1024,
            vocab_size=50257,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "layers": 12,
        "width": 768,
        "heads": 12,
        "lora": ["c_attn", "mlp.c_proj"],
    },
    "llama-1b": {
        "family": "llama",
        "config": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
        ),
        "layers": 22,
        "width": 2048,
        "heads": 32,
        "lora": ["q_proj", "v_proj", "down_proj"],
    },
}
FULL_RUNS = ("plain", "interchange", "das", "preserve", "circuit", "sae", "lora", "lora+interchange", "lora+preserve")
LORA_RUNS = ("lora", "lora+interchange", "lora+preserve")


class KeyCopy(Task):
    """Random tokens; the answer is the token at position 1 (``key``), read from the last position:
    a retrieval across the whole sequence whose one variable has a known place."""

    name = "key_copy"
    variables = ("key",)

    def __init__(self, length: int = 128, n_symbols: int = 64):
        self.length, self.n_symbols = length, n_symbols

    @property
    def vocab_size(self) -> int:
        return self.n_symbols

    @property
    def seq_len(self) -> int:
        return self.length

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        ids = torch.randint(0, self.n_symbols, (n, self.length), generator=generator)
        return {"input_ids": ids, "labels": ids[:, 1].clone(), "var/key": ids[:, 1].clone()}

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        return variables["key"]


def _objectives(run: str, shape: dict[str, Any]) -> list[dict[str, Any]]:
    middle, width, heads = shape["layers"] // 2, shape["width"], shape["heads"]
    site = f"blocks.{middle}.resid_post"  # gpt2-124m: blocks.6 (the site); llama-1b: blocks.11
    key = {"site": site, "positions": [1], "dims": [0, width // 2]}
    kind = run.split("+")[-1]
    if kind == "interchange":
        return [{"name": "interchange", "alignment": {"key": key}}]
    if kind == "das":
        return [{"name": "interchange", "subspace": "learned", "alignment": {"key": {**key, "dims": [0, 64]}}}]
    if kind == "preserve":
        return [{"name": "preserve"}]
    if kind == "circuit":
        nodes = [{"site": f"blocks.{i}.attn.heads", "heads": list(range(heads // 2))} for i in range(shape["layers"])]
        return [
            {
                "name": "circuit",
                "circuit": nodes + [f"blocks.{i}.mlp.out" for i in range(shape["layers"])],
                "ablation": "mean",
            }
        ]
    if kind == "sae":
        return [{"name": "sae", "site": site, "expansion": 8, "k": 32}]
    return []


def one_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: ``{"seconds", "peak_gb", "trainable", "parameters"}``."""
    from lightning.pytorch import Callback
    from omegaconf import OmegaConf

    from faithful_train.training import run as runs
    from faithful_train.training.config import compose

    torch.set_num_threads(spec["threads"])
    shape = MODELS[spec["model"]]
    model: dict[str, Any] = {"arch": "hf", "path": spec["path"]}
    if spec["run"].startswith("lora"):
        model["lora"] = {"r": 16, "alpha": 32, "target_modules": shape["lora"]}
    if spec["checkpointing"]:
        model["activation_checkpointing"] = True
    cuda = torch.cuda.is_available()
    steps = spec["warmup"] + spec["steps"]
    config = {
        "seed": 0,
        "model": model,
        "task": {"name": f"{HERE}:KeyCopy", "length": spec["length"]},
        "objectives": _objectives(spec["run"], shape),
        "audits": [],
        "trainer": {
            "max_steps": steps,
            "val_every": 10**9,
            "checkpoint_every": 10**9,
            "progress_bar": False,
            "precision": spec["precision"],
            "accelerator": "gpu" if cuda else "cpu",
        },
        "data": {"batch_size": spec["batch"], "val_size": spec["batch"], "val_batch_size": spec["batch"]},
        "logger": {"csv": False, "wandb": {"mode": "disabled"}},
    }
    times: list[float] = []
    peaks: list[tuple[float, float]] = []  # (peak, peak less the step's start), GB

    class Timer(Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            self.at_start = _memory_now(cuda)
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            peak = _memory_peak(cuda)
            peaks.append((peak, peak - self.at_start))

    runs.quiet_lightning()
    with tempfile.TemporaryDirectory() as run_dir:
        run = runs.build(compose(OmegaConf.create(config)), run_dir)
        trainable = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in run.module.model.parameters())
        trainer = runs.make_trainer(run, [Timer()])
        trainer.fit(run.module, run.datamodule)
    measured = peaks[spec["warmup"] :]
    return {
        "seconds": statistics.median(times[spec["warmup"] :]),
        "peak_gb": max(p for p, _ in measured),
        "step_gb": max(s for _, s in measured),
        "trainable": trainable,
        "parameters": total,
    }


def _memory_now(cuda: bool) -> float:
    """GB in use now (and the peak counter reset to it): allocated on a GPU; on a CPU the resident
    set, after freed memory went back to the system."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**30
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _status("VmRSS")


def _memory_peak(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else _status("VmHWM")


def _status(key: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) / 2**20


def _save_model(name: str, root: Path) -> Path:
    from faithful_train.modeling.hf import HFAdapter

    where = root / name
    if not (where / "config.json").is_file():
        shape = MODELS[name]
        HFAdapter.from_config(shape["family"], shape["config"], seed=0).save_pretrained(where)
    return where


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration, ``--rounds`` times over, interleaved (round r runs every configuration
    once), so a drift in the machine's speed hits every configuration alike; each figure is the
    median over rounds, a ratio the median of each round's ratio to its plain run."""
    results: list[dict[str, Any]] = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        paths = {name: _save_model(name, Path(root)) for name in args.models}
        for round_ in range(args.rounds):
            for name in args.models:
                for precision in args.precisions:
                    for checkpointing in (False, True):
                        for kind in args.runs or (LORA_RUNS if name == "llama-1b" else FULL_RUNS):
                            spec = {
                                "model": name,
                                "path": str(paths[name]),
                                "run": kind,
                                "checkpointing": checkpointing,
                                "precision": precision,
                                "threads": args.threads,
                                "batch": args.batch,
                                "length": args.length,
                                "warmup": args.warmup,
                                "steps": args.steps if name != "llama-1b" else max(1, args.steps - 1),
                            }
                            done = subprocess.run(
                                [sys.executable, str(HERE), "--one", json.dumps(spec)], capture_output=True, text=True
                            )
                            if done.returncode != 0:
                                print(done.stderr[-2000:], file=sys.stderr)
                                raise SystemExit(f"{name} {kind} failed")
                            result = json.loads(done.stdout.strip().splitlines()[-1])
                            results.append(
                                {
                                    **{k: spec[k] for k in ("model", "run", "checkpointing", "precision")},
                                    "round": round_,
                                    **result,
                                }
                            )
                            print(
                                f"round {round_}: {name} {kind} {precision} checkpointing={checkpointing}: "
                                f"{result['seconds']:.2f} s",
                                file=sys.stderr,
                                flush=True,
                            )
    return summarise(results)


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: medians over rounds, ratios to the same round's plain run."""

    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["run"], r["checkpointing"], r["precision"]

    def plain(r: dict[str, Any]) -> dict[str, Any] | None:
        name = "lora" if r["model"] == "llama-1b" else "plain"
        return next(
            (
                p
                for p in results
                if key(p) == (r["model"], name, r["checkpointing"], r["precision"]) and p["round"] == r["round"]
            ),
            None,
        )

    rows = []
    for k in dict.fromkeys(key(r) for r in results):
        mine = [r for r in results if key(r) == k]
        bases = [plain(r) for r in mine]
        row = dict(zip(("model", "run", "checkpointing", "precision"), k))
        row |= {f: statistics.median(r[f] for r in mine) for f in ("seconds", "peak_gb", "step_gb")}
        row |= {"trainable": mine[0]["trainable"], "parameters": mine[0]["parameters"], "rounds": len(mine)}
        if all(b is not None for b in bases):
            row["time_ratio"] = statistics.median(r["seconds"] / b["seconds"] for r, b in zip(mine, bases))
            row["memory_ratio"] = statistics.median(r["step_gb"] / b["step_gb"] for r, b in zip(mine, bases))
        rows.append(row)
    return rows


def _row(row: dict[str, Any]) -> str:
    ratio = f"{row['time_ratio']:.2f}x" if "time_ratio" in row else "-"
    memory = f"{row['memory_ratio']:.2f}x" if "memory_ratio" in row else "-"
    share = 100 * row["trainable"] / row["parameters"]
    return (
        f"| {row['model']} | {row['run']} | {row['precision']} | {'on' if row['checkpointing'] else 'off'} "
        f"| {row['seconds']:.2f} | {ratio} | {row['peak_gb']:.2f} | {row['step_gb']:.2f} | {memory} | {share:.2f}% |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", nargs="+", choices=FULL_RUNS, help="default: every run (llama-1b: the LoRA ones)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true", "bf16-mixed"] if torch.cuda.is_available() else ["32-true"],
        help=(
            "default: fp32 and bf16-mixed on a GPU; fp32 on a CPU (without bf16 units a bf16-mixed step is ~28x slower)"
        ),
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", default=None, help="where the models are written (default: the system's temp)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, batch {args.batch} x {args.length} tokens"
    )
    print("| model | run | precision | checkpointing | s/step | vs plain | peak GB | step GB | vs plain | trainable |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = run_all(args)
    for row in rows:
        print(_row(row))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
