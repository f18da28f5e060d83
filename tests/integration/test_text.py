"""Text data end to end: the IOI testbed, the text task from files, every objective and audit on
a text task (or a one-line error naming what it needs), resume at the exact example, export and
reload with transformers, and bad data as one line with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.tasks.ioi import write_ioi
from tests.integration.test_cli import _summary, fit_whole_and_resumed
from tests.unit.text_rows import color_rows, word_tokenizer, write_jsonl

TINY = [
    "trainer.max_steps=8",
    "trainer.val_every=4",
    "trainer.progress_bar=false",
    "logger.wandb.mode=disabled",
    "data.batch_size=16",
    "data.val_size=32",
]


@pytest.fixture(scope="module")
def ioi(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ioi")
    write_ioi(out, seed=0, n_train=256, n_val=64, n_audit=64, n_text=32, n_corpus=64)
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, repo):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(repo)


def ioi_files(ioi: Path) -> list[str]:
    return [
        f"task.train={ioi}/train.jsonl",
        f"task.val={ioi}/val.jsonl",
        f"task.audit={ioi}/audit.jsonl",
        f"task.tokenizer={ioi}/tokenizer",
        f"task.ppl={ioi}/text.txt",
        f"task.lm_text={ioi}/corpus.txt",
    ]


def test_ioi_workflow_pretrain_export_finetune(ioi, tmp_path, capsys):
    """The IOI workflow of docs/guide/text-data.md on a tiny set: pretrain, export, fine-tune the export with IIT
    and preserve, and the baseline; the figures the issue names are all there."""
    pre, hf = tmp_path / "pre", tmp_path / "pre" / "hf"
    audit = ["audits.0.n_examples=32", "audits.0.every_n_steps=4"]
    assert main(["fit", "-c", "configs/ioi-pretrain.yaml", "--run-dir", str(pre), *TINY, *ioi_files(ioi), *audit]) == 0
    metrics = _summary(pre)["metrics"]
    for key in ("val/task_acc", "val/ppl", "train/objective/language_model", "audit/interchange/iia"):
        assert key in metrics, key
    assert main(["export", str(pre), "--out", str(hf)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer("When Mary and John went to the store , John gave a drink to", return_tensors="pt")["input_ids"]
    state = torch.load(pre / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    ours = {k.removeprefix("model.hf_model."): v for k, v in state.items() if k.startswith("model.hf_model.")}
    torch.testing.assert_close(
        model.state_dict()["transformer.h.0.attn.c_attn.weight"], ours["transformer.h.0.attn.c_attn.weight"]
    )
    assert model(ids).logits.shape[-1] == len(tokenizer)
    for config in ("configs/ioi-iit.yaml", "configs/ioi-baseline.yaml"):
        run = tmp_path / Path(config).stem
        extra = [f"model.path={hf}", *audit] + (["objectives.0.n_examples=1"] if False else [])
        assert main(["fit", "-c", config, "--run-dir", str(run), *TINY, *ioi_files(ioi), *extra]) == 0, config
        metrics = _summary(run)["metrics"]
        for key in ("val/task_acc", "val/ppl", "val/kl_to_start", "audit/interchange/iia", "audit/interchange/iia/IO"):
            assert key in metrics, (config, key)
        if config.endswith("iit.yaml"):
            assert "train/objective/interchange" in metrics and "train/objective/preserve" in metrics


def test_text_run_resumes_at_the_exact_example(ioi, tmp_path):
    overrides = [
        *TINY,
        *ioi_files(ioi),
        "trainer.max_steps=12",
        "trainer.checkpoint_every=6",
        "audits=[]",
        "data.batch_size=24",
    ]
    whole, split = fit_whole_and_resumed("configs/ioi-pretrain.yaml", overrides, tmp_path, stop=6)
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_data_show_marks_answer_spans_and_aligned_positions(ioi, capsys):
    assert main(["data", "show", "-c", "configs/ioi-iit.yaml", "-n", "2", *ioi_files(ioi)]) == 0
    out = capsys.readouterr().out
    assert "predicts answer[0]" in out and "span IO" in out and "span S2" in out
    assert "objectives.0:IO @ blocks.1.resid_post" in out and "audits.0:IO @ blocks.1.resid_post" in out
    first = out.split("example 1")[0]
    marked = [line for line in first.splitlines() if "objectives.0:IO" in line]
    assert len(marked) == 1 and "predicts answer[0]" in marked[0]  # `last`: the prompt's last token


# --- every objective and audit on a text task ---------------------------------------------------


@pytest.fixture(scope="module")
def colors(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("colors")
    path = write_jsonl(root / "rows.jsonl", color_rows(32))
    tok = word_tokenizer(root / "tok")
    return ["task.name=text", f"task.train={path}", f"task.tokenizer={tok}"]


@pytest.fixture(scope="module")
def short_colors(tmp_path_factory) -> list[str]:
    """One-token answers only (a concept bottleneck answers with one token)."""
    root = tmp_path_factory.mktemp("short")
    rows = [
        {k: v for k, v in r.items() if k not in ("source", "counterfactual_answer")}
        for r in color_rows(48)
        if " " not in r["answer"]
    ]
    path = write_jsonl(root / "rows.jsonl", rows)
    tok = word_tokenizer(root / "tok")
    return ["task.name=text", f"task.train={path}", f"task.tokenizer={tok}"]


def _config(tmp_path: Path, model: object, objectives: list, audits: list) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        json.dumps(
            {
                "model": model,
                "task": {"name": "text", "train": "x", "tokenizer": "x"},
                "objectives": objectives,
                "audits": audits,
            }
        )
    )
    return str(path)


SPAN = {"site": "blocks.0.resid_post", "positions": {"span": "thing", "token": "last"}}
AUDIT = {"every_n_steps": 4, "n_examples": 16, "batch_size": 8}
CASES = {
    "interchange": (
        "dense-tiny",
        [{"name": "interchange", "alignment": {"thing": SPAN}}],
        [{"name": "interchange", "alignment": {"thing": SPAN}, **AUDIT}],
    ),
    "interchange-das": (
        "dense-tiny",
        [{"name": "interchange", "subspace": "learned", "alignment": {"thing": {**SPAN, "dims": [0, 8]}}}],
        [
            {
                "name": "interchange",
                "hypothesis": "hypotheses/interchange.json",
                "alignment": {"thing": {**SPAN, "dims": [0, 8]}},
                **AUDIT,
            }
        ],
    ),
    "stability": (
        "dense-tiny",
        [{"name": "stability", "stability": 1.0, "right_reasons": 1.0, "fraction": 0.5}],
        [{"name": "attribution", "steps": 4, **AUDIT}],
    ),
    "concepts": (
        {"preset": "dense-tiny", "bottleneck": {"mode": "hybrid"}},
        [{"name": "concepts", "leakage": 0.1}],
        [{"name": "concepts", "probe_steps": 20, **AUDIT}],
    ),
    "router": (
        "moe-tiny",
        [{"name": "router", "load_balance": 0.01, "alignment": 0.1, "concept": "kind"}],
        [{"name": "router", "stability": False, **AUDIT}],
    ),
    "preserve": ("dense-tiny", [{"name": "preserve"}], []),
    "hf-llama": (
        "llama-tiny",
        [{"name": "interchange", "alignment": {"thing": SPAN}}, {"name": "preserve"}],
        [{"name": "interchange", "alignment": {"thing": SPAN}, **AUDIT}],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_and_audit_runs_on_a_text_task(case, colors, short_colors, tmp_path):
    model, objectives, audits = CASES[case]
    config = _config(tmp_path, model, objectives, audits)
    data = short_colors if case == "concepts" else colors
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path / "run"), *TINY, *data]) == 0
    metrics = _summary(tmp_path / "run")["metrics"]
    for objective in objectives:
        assert f"train/objective/{objective['name']}" in metrics
    for audit in audits:
        assert any(k.startswith(f"audit/{audit['name']}/") for k in metrics), audit["name"]
    assert all(v == v for v in metrics.values()), metrics  # no NaN


@pytest.mark.parametrize(
    "objectives, audits, message",
    [
        ([{"name": "counterfactual_cot"}], [], "needs a task with written reasoning steps"),
        ([], [{"name": "cot"}], "needs a task with written reasoning steps"),
        ([], [{"name": "router", **AUDIT}], "position-aligned perturbations"),
        ([{"name": "interchange", "alignment": {"color": SPAN}}], [], "'variables.color' column"),
        (
            [{"name": "interchange", "alignment": {"thing": {"site": "embed", "positions": {"span": "nope"}}}}],
            [],
            "unknown span",
        ),
        ([{"name": "concepts"}], [], "a concept bottleneck answers with one token"),
    ],
)
def test_what_a_text_task_cannot_give_is_one_line(objectives, audits, message, colors, tmp_path, capsys):
    model = "moe-tiny" if audits and audits[0]["name"] == "router" else "dense-tiny"
    if objectives and objectives[0]["name"] == "concepts":
        model = {"preset": "dense-tiny", "bottleneck": {"mode": "hard"}}
    config = _config(tmp_path, model, objectives, audits)
    assert main(["fit", "-c", config, "--run-dir", str(tmp_path / "run"), *TINY, *colors]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_is_one_line_exit_2_and_writes_nothing(ioi, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rows = [json.loads(line) for line in (ioi / "train.jsonl").read_text().splitlines()]
    rows[3]["spans"]["IO"] = "Nobody"
    write_jsonl(bad, rows)
    cases = [
        ([f"task.train={tmp_path}/none.jsonl"], "file not found"),
        ([f"task.train={bad}"], f"{bad} row 3 column 'spans.IO': 'Nobody' is not in the prompt"),
        ([f"task.tokenizer={tmp_path}"], "no tokenizer in"),
        (["model.config.n_positions=8"], "longer than the model's context (8)"),
    ]
    for overrides, message in cases:
        run = tmp_path / "run"
        args = ["fit", "-c", "configs/ioi-pretrain.yaml", "--run-dir", str(run), *TINY, *ioi_files(ioi), *overrides]
        assert main(args) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not run.exists()
