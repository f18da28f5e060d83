"""Time an activation-patching sweep: ours (every cell a variant of one engine call) against
TransformerLens's ``get_act_patch_*`` (one forward per cell) and against our own
one-forward-per-cell loop, on the same weights and inputs; and check that the maps agree.

    make benchmarks            # or: TL_LIB=.bench .venv/bin/python benchmarks/patching.py

TransformerLens is a peer only, installed beside the venv (``make .bench/transformer_lens``:
``pip install --no-deps --target .bench transformer-lens==4.3.0`` and the few packages it
imports; torch and transformers stay the venv's). Version 4 reaches a Hugging Face model
through ``TransformerBridge.boot_transformers(<local dir>)``, which keeps the raw weights
(no LayerNorm folding) and runs eager attention.

Model: our dense transformer (d_model 64, 2 layers, 4 heads, d_mlp 256, vocab 64) with weights
drawn at std 0.3 (so the metric is not ~0), converted to GPT-2 (``modeling.convert.to_gpt2``)
and saved; the same weights run as ours (``Transformer``), wrapped (``HFAdapter`` on the saved
GPT-2) and in TransformerLens. Inputs: B = 16 random prompts of T = 16 tokens, the corrupted
ones with token 5 resampled. Metric: the mean over the batch of ``logit[a] - logit[b]`` at the
last position. A sweep is one component's layer × position map (× head for ``heads``: TL's
``get_act_patch_attn_head_out_by_pos``), all of it: for TransformerLens the clean
``run_with_cache`` and the patching call; for ours ``activation_patching`` (its own clean and
corrupted forwards included). Timings are medians over interleaved rounds
(``benchmarks.pyvene_peer.time_steps``), so drifting load hits every variant alike.

``--tl-maps IN OUT`` (used by tests/unit/functional/test_patching.py, in a process of its own): read
``{"model_dir", "clean", "corrupted", "answers"}`` from ``IN`` and write TransformerLens's four
maps, denoising and noising, to ``OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peers import import_peer  # noqa: E402
from benchmarks.pyvene_peer import time_steps  # noqa: E402
from faithful_train.functional.patching import activation_patching, attribution_patching, patching_cells  # noqa: E402
from faithful_train.intervene.sites import hooked  # noqa: E402

TL_FUNCTIONS = {
    "resid_pre": "get_act_patch_resid_pre",
    "attn.out": "get_act_patch_attn_out",
    "mlp.out": "get_act_patch_mlp_out",
    "heads": "get_act_patch_attn_head_out_by_pos",
}
COMPONENTS = tuple(TL_FUNCTIONS)


def import_transformer_lens() -> Any:
    """``transformer_lens.patching``, from the venv or ``$TL_LIB`` (after the venv's packages)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # a progress bar per sweep otherwise
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return import_peer("transformer_lens.patching", "TL_LIB", "make .bench/transformer_lens")


def tl_bridge(model_dir: str | Path) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with contextlib.redirect_stdout(io.StringIO()):
        return TransformerBridge.boot_transformers(str(model_dir), device="cpu").eval()


def tl_maps(
    bridge: Any, clean: torch.Tensor, corrupted: torch.Tensor, metric: Callable, direction: str = "denoising"
) -> dict[str, torch.Tensor]:
    """TransformerLens's four maps: ``[L, T]`` (``[L, T, H]`` for heads); noising swaps the roles."""
    patching = import_transformer_lens()
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(source)
        return {c: getattr(patching, fn)(bridge, base, cache, metric) for c, fn in TL_FUNCTIONS.items()}


def make_models(
    directory: Path, seed: int = 0, d_model: int = 64, n_layers: int = 2, vocab: int = 64, context: int = 32
) -> tuple[Any, Any]:
    """Ours and the same weights as a saved GPT-2 (``directory``), wrapped: ``(ours, HFAdapter)``."""
    from faithful_train.modeling.convert import to_gpt2
    from faithful_train.modeling.hf import HFAdapter
    from faithful_train.modeling.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    ours = Transformer(
        TransformerConfig(
            vocab_size=vocab, max_seq_len=context, d_model=d_model, n_layers=n_layers, n_heads=4, d_mlp=4 * d_model
        )
    )
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
            elif "ln" not in name:
                p.normal_(0.0, 0.1)
    hf = to_gpt2(ours.eval())
    hf.config.bos_token_id = hf.config.eos_token_id = 0  # inside the vocabulary
    hf.save_pretrained(directory)
    return ours.eval(), HFAdapter.from_pretrained(directory).eval()


def make_inputs(batch: int = 16, length: int = 16, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (batch, length), generator=g)
    corrupted = clean.clone()
    corrupted[:, 5] = (clean[:, 5] - 1 + torch.randint(1, vocab - 1, (batch,), generator=g)) % (
        vocab - 1
    ) + 1  # never the same
    return clean, corrupted


def our_maps(
    model: Any,
    clean: torch.Tensor,
    corrupted: torch.Tensor,
    answers: tuple[int, int],
    components: tuple[str, ...] = COMPONENTS,
    direction: str = "denoising",
    atp: bool = False,
) -> dict[str, torch.Tensor]:
    """Our maps in TransformerLens's shapes, from ``activation_patching`` (or AtP)."""
    a, b = answers
    metric = lambda logits, _clean: logits[..., a] - logits[..., b]  # noqa: E731
    out = {}
    for component in components:
        cells = patching_cells(model, [component], range(clean.shape[1]))
        sweep = attribution_patching if atp else activation_patching
        with torch.no_grad():
            values = sweep(model, {"input_ids": clean}, {"input_ids": corrupted}, cells, metric, direction).values.mean(
                1
            )
        out[component] = values.view(model.n_layers, clean.shape[1], -1).squeeze(-1)
    return out


def loop_sweep(
    model: Any, clean: torch.Tensor, corrupted: torch.Tensor, answers: tuple[int, int], component: str
) -> torch.Tensor:
    """The plain way: record the clean run, then one hooked forward of the corrupted batch per cell."""
    a, b = answers
    cells = patching_cells(model, [component], range(clean.shape[1]))
    with torch.no_grad():
        with hooked(model, record=sorted({c.site for c in cells})) as cache:
            model(clean)
        values = []
        for cell in cells:

            def edit(t: torch.Tensor, cell=cell) -> torch.Tensor:
                t = t.clone()
                if cell.head is None:
                    t[:, cell.position] = cache[cell.site][:, cell.position]
                else:
                    t[:, cell.position, cell.head] = cache[cell.site][:, cell.position, cell.head]
                return t

            with hooked(model, edits={cell.site: edit}):
                logits = model(corrupted)[:, -1]
            values.append((logits[:, a] - logits[:, b]).mean())
    return torch.stack(values)


def run(rounds: int, threads: int, batch: int, length: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    answers = (3, 7)
    metric = lambda logits: (logits[:, -1, answers[0]] - logits[:, -1, answers[1]]).mean()  # noqa: E731
    clean, corrupted = make_inputs(batch, length)
    with tempfile.TemporaryDirectory() as directory:
        ours, wrapped = make_models(Path(directory))
        bridge = tl_bridge(directory)
        patching = import_transformer_lens()
        check = {
            c: (our_maps(ours, clean, corrupted, answers, [c])[c] - m).abs().max().item()
            for c, m in tl_maps(bridge, clean, corrupted, metric).items()
        }

        def tl_sweep(component: str) -> Callable[[], Any]:
            def sweep() -> Any:
                with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
                    _, cache = bridge.run_with_cache(clean)
                    return getattr(patching, TL_FUNCTIONS[component])(bridge, corrupted, cache, metric)

            return sweep

        def ours_sweep(model: Any, components: tuple[str, ...], atp: bool = False) -> Callable[[], Any]:
            return lambda: our_maps(model, clean, corrupted, answers, components, atp=atp)

        steps = {}
        for c in COMPONENTS:
            steps |= {
                f"ours {c}": ours_sweep(ours, (c,)),
                f"ours (HFAdapter gpt2) {c}": ours_sweep(wrapped, (c,)),
                f"our loop {c}": lambda c=c: loop_sweep(ours, clean, corrupted, answers, c),
                f"TL {c}": tl_sweep(c),
            }
        steps["ours AtP, all four"] = ours_sweep(ours, COMPONENTS, atp=True)
        ms = time_steps(steps, warmup=2, rounds=rounds)
    return {"ms": ms, "max_abs_diff_vs_tl": check}


def write_tl_maps(inputs: Path, output: Path) -> None:
    torch.set_num_threads(1)  # tiny models: a second thread only fights the test process for the core
    spec = torch.load(inputs)
    a, b = spec["answers"]
    metric = lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()  # noqa: E731
    bridge = tl_bridge(spec["model_dir"])
    maps = {
        f"{d}/{c}": m
        for d in ("denoising", "noising")
        for c, m in tl_maps(bridge, spec["clean"], spec["corrupted"], metric, d).items()
    }
    torch.save(maps, output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--tl-maps", nargs=2, type=Path, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import_transformer_lens()
    except ImportError as e:
        print(e)
        sys.exit(3)
    if args.tl_maps:
        write_tl_maps(*args.tl_maps)
        return
    result = run(args.rounds, args.threads, args.batch_size, args.length)
    ms = result["ms"]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
        f"batch {args.batch_size} x {args.length} tokens"
    )
    print("max |ours - TL| per map: " + ", ".join(f"{c} {v:.2g}" for c, v in result["max_abs_diff_vs_tl"].items()))
    print(
        "| component | cells | TL ms | our loop ms | ours (gpt2 adapter) ms | ours ms | TL / ours | loop / ours |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for c in COMPONENTS:
        cells = 2 * args.length * (4 if c == "heads" else 1)
        print(
            f"| {c} | {cells} | {ms[f'TL {c}']:.1f} | {ms[f'our loop {c}']:.1f} | "
            f"{ms[f'ours (HFAdapter gpt2) {c}']:.1f} | {ms[f'ours {c}']:.1f} | {ms[f'TL {c}'] / ms[f'ours {c}']:.1f}× "
            f"| {ms[f'our loop {c}'] / ms[f'ours {c}']:.1f}× |"
        )
    total = {k: sum(ms[f"{k} {c}"] for c in COMPONENTS) for k in ("TL", "our loop", "ours (HFAdapter gpt2)", "ours")}
    print(
        f"| all four | {2 * args.length * 7} | {total['TL']:.1f} | {total['our loop']:.1f} | "
        f"{total['ours (HFAdapter gpt2)']:.1f} | {total['ours']:.1f} | {total['TL'] / total['ours']:.1f}× | "
        f"{total['our loop'] / total['ours']:.1f}× |"
    )
    print(f"ours AtP (all four maps, two forwards and one backward): {ms['ours AtP, all four']:.1f} ms")
    print(f"TL / ours (HFAdapter gpt2, same HF modules): {total['TL'] / total['ours (HFAdapter gpt2)']:.1f}×")
    if args.json:
        args.json.write_text(
            json.dumps(
                result | {"threads": args.threads, "batch_size": args.batch_size, "length": args.length}, indent=2
            )
        )


if __name__ == "__main__":
    main()
