"""Time per training step on padded text, as a ratio to the same step on equal-length ids.

    make benchmarks            # or: .venv/bin/python benchmarks/text_step.py [--rounds 40]

Batches of 128 rows of ``T = 20`` token positions (IOI prompts are 14-20 tokens): "equal-length"
rows fill all ``T`` positions with no attention mask (the generated tasks' case, fused causal
attention); "padded" rows have lengths drawn from ``[T - 6, T]``, right- or left-padded to ``T``,
with an ``attention_mask`` and per-row answer positions, as the ``text`` task makes them. Every
step is our training step (``FaithfulModule.training_step`` without Lightning's logging): forward
(every position's logits, which the language-model loss and ``preserve`` read), the answer
positions gathered, mean answer cross-entropy, backward, AdamW step. Models: our ``dense-tiny``
and Hugging Face ``gpt2-tiny``. The issue's target: padded <= 1.1x.
Timings: medians over interleaved rounds (``time_steps``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interchange_step import optimizer_for  # noqa: E402
from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.modeling import build_model  # noqa: E402
from faithful_train.tasks.batch import answer_positions, gather_positions  # noqa: E402
from faithful_train.training.config import find_preset  # noqa: E402
from faithful_train.training.module import task_loss  # noqa: E402

VOCAB, T = 200, 20


def make_model(preset: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    return build_model(OmegaConf.load(find_preset(preset)), VOCAB, 64, seed=0).train()


def batches(batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (batch_size, T), generator=g)
    labels = torch.randint(2, VOCAB, (batch_size,), generator=g)
    lengths = torch.randint(T - 6, T + 1, (batch_size,), generator=g)
    out = {"equal-length ids": {"input_ids": ids, "labels": labels}}
    for side in ("right", "left"):
        keys = torch.arange(T)[None]
        mask = (keys < lengths[:, None]) if side == "right" else (keys >= T - lengths[:, None])
        last = (lengths - 1) if side == "right" else torch.full_like(lengths, T - 1)
        out[f"padded {side}"] = {
            "input_ids": torch.where(mask, ids, 0),
            "attention_mask": mask.long(),
            "labels": labels,
            "answer_pos": last[:, None],
            "answer_ids": labels[:, None],
            "answer_mask": torch.ones(batch_size, 1, dtype=torch.bool),
        }
    return out


def training_step(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    optimizer = optimizer_for(model.parameters())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        answers = gather_positions(logits, answer_positions(batch))
        loss = task_loss(answers, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def run(batch_size: int, rounds: int, threads: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    data = batches(batch_size)
    results = {}
    for preset in ("dense-tiny", "gpt2-tiny"):
        steps = {name: training_step(make_model(preset), batch) for name, batch in data.items()}
        results[preset] = time_steps(steps, rounds=rounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.batch_size, args.rounds, args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"batch {args.batch_size}, T {T}"
    )
    print("| model | batch | ms/step | × equal-length |\n|---|---|---|---|")
    for preset, ms in results.items():
        for name, value in ms.items():
            print(f"| {preset} | {name} | {value:.2f} | {value / ms['equal-length ids']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
