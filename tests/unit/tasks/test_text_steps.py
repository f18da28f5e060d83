"""Reasoning text: rows with a rationale (the ``steps`` column), files in GSM8K's format read as
they are, the generated arithmetic set (``data arithmetic``) with counterfactual steps, and
one-line errors for bad rationales."""

from __future__ import annotations

import json

import pytest
import torch

from faithful_train.commands.cli import main
from faithful_train.errors import DataError
from faithful_train.tasks.arithmetic_text import MAX_VALUE, write_arithmetic
from faithful_train.tasks.text import TextTask
from tests.unit.text_rows import word_tokenizer, write_jsonl

WORDS = "how many pens are left ? Ana had 5 pens and gave 2 away 5 - 2 = 3 3 * 2 = 6 so 6 7 8 9 12 ####".split()

GSM8K = [
    {
        "question": "Ana had 5 pens and gave 2 away how many pens are left ?",
        "answer": "5 - 2 = 3\n3 * 2 = 6\n#### 6",
    },
    {"question": "Ana had 5 pens how many pens are left ?", "answer": "so 5 - 2 = 3\n\n#### 3"},
    {"question": "how many pens are left ?", "answer": "5 - 2 = 3\n3 * 2 = 6\n6 - 2 = 12\n#### 12"},
]


@pytest.fixture
def tok(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    return str(word_tokenizer(tmp_path / "tok", WORDS))


def _texts(task, batch, b, span):
    ids = batch["input_ids"][b]
    start, stop = span
    return " ".join(task.tokenizer.convert_ids_to_tokens(ids[start:stop].tolist()))


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_gsm8k_file_loads_with_its_steps_and_answers(tmp_path, tok, side):
    task = TextTask(str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)), tok, padding_side=side)
    assert task.min_steps == 1 and task.spans == ("step0",)
    batch = task.rows("train", range(3))
    assert batch["n_steps"].tolist() == [2, 1, 3]
    decode = task.tokenizer.convert_ids_to_tokens
    assert decode(batch["labels"].tolist()) == ["6", "3", "12"]
    for b, row in enumerate(GSM8K):
        lines = [line for line in row["answer"].split("####")[0].splitlines() if line.strip()]
        for j, line in enumerate(lines):
            start, stop = batch["step_spans"][b, j].tolist()
            assert _texts(task, batch, b, (start, stop)) == line
        assert (batch["step_spans"][b, len(lines) :] == -1).all()
        # the rationale sits between the prompt and the answer, then "####", where the answer is read
        assert batch["step_spans"][b, len(lines) - 1, 1] == batch["answer_pos"][b, 0]
        assert _texts(task, batch, b, (int(batch["answer_pos"][b, 0]), int(batch["answer_pos"][b, 0]) + 1)) == "####"
    assert torch.equal(batch["span/step0"], batch["step_spans"][:, 0])


def test_data_show_marks_the_step_spans(tmp_path, tok, capsys):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K)
    config = tmp_path / "c.yaml"
    config.write_text(f"model: gpt2-tiny\ntask: {{name: text, train: {data}, tokenizer: {tok}}}\n")
    assert main(["data", "show", "-c", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    marked = [line.split()[1] for line in out.splitlines() if "span step0" in line]
    assert marked == "5 - 2 = 3".split()


def test_the_arithmetic_set_has_chained_steps_and_counterfactual_rationales(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    paths = write_arithmetic(tmp_path / "arith", seed=3, n_train=200, n_val=20, n_audit=20, hint=True)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    audit = [json.loads(line) for line in paths["audit"].read_text().splitlines()]
    assert {len(r["steps"]) for r in rows} == {2, 3, 4}

    def pairs(split):  # (name, item) of "hint : 8 . Ana has 7 apples . ..."
        return {(r["prompt"].split()[4], r["prompt"].split()[7]) for r in split}

    assert not pairs(audit) & pairs(rows)  # the audit's problems are about pairs train never uses
    words = lambda split: {w for r in split for w in r["prompt"].split()}  # noqa: E731
    assert words(audit) - {str(i) for i in range(MAX_VALUE + 1)} <= words(rows)  # in words it has read
    for row in rows:
        assert row["prompt"].startswith(f"hint : {row['answer']} .") and row["conclusion"] == "####"
        left = int(row["prompt"].split()[6])
        for step in row["steps"]:  # each step starts from the previous result, and computes it
            a, op, b, eq, y = step.split()
            assert int(a) == left and eq == "="
            assert int(y) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert 0 <= int(y) <= MAX_VALUE
            left = int(y)
        assert row["answer"] == str(left)
        j, cf = row["counterfactual.step"], row["counterfactual.steps"]
        assert cf[:j] == row["steps"][:j] and cf[j] != row["steps"][j]
        assert cf[j].split()[:4] == row["steps"][j].split()[:4]  # only the result is wrong
        for prev, step in zip(cf[j:], cf[j + 1 :]):
            a, op, b, _, y = step.split()
            assert int(a) == int(prev.split()[-1])
            assert int(y) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["counterfactual.answer"] == cf[-1].split()[-1] != row["answer"]
    task = TextTask(str(paths["train"]), str(paths["tokenizer"]), val=str(paths["val"]), audit=str(paths["audit"]))
    unknown = task.tokenizer.unk_token_id
    assert all(unknown not in tokens for split in task.splits.values() for tokens in split["tokens"])
    assert task.min_steps == 2 and "counterfactual_evidence" in task.provides
    batch = task.rows("train", range(16))
    changed, answers = task.counterfactual_evidence(batch, torch.Generator())
    decode = task.tokenizer.convert_ids_to_tokens
    assert decode(answers.tolist()) == [r["counterfactual.answer"] for r in rows[:16]]
    for b in range(16):  # only the rationale changed, from the changed step on
        differ = (changed[b] != batch["input_ids"][b]).nonzero()[:, 0]
        first = batch["step_spans"][b, batch["cf_step"][b], 0]
        assert len(differ) and differ.min() >= first
        assert differ.max() < batch["step_spans"][b, batch["n_steps"][b] - 1, 1]


def test_data_arithmetic_command_writes_the_set(tmp_path, capsys):
    assert main(["data", "arithmetic", "--out", str(tmp_path / "a"), "--train", "50"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "audit.jsonl",
        "tokenizer",
        "train.jsonl",
        "val.jsonl",
    ]
    assert len((tmp_path / "a" / "train.jsonl").read_text().splitlines()) == 50


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "how many pens", "steps": "5 - 2 = 3", "answer": "3"}],
            "row 0 column 'steps': a list of non-empty step texts",
        ),
        ([{"prompt": "how many pens", "steps": ["5 - 2 = 3", ""], "answer": "3"}], "row 0 column 'steps'"),
        (
            [{"question": "how many pens", "answer": "5 - 2 = 3\n3"}],
            "row 0 column 'answer': a GSM8K solution ends with '#### <answer>'",
        ),
        ([{"question": "how many pens", "answer": "5 - 2 = 3\n#### "}], "nothing after '####'"),
        (
            [
                {
                    "prompt": "how many pens",
                    "steps": ["5 - 2 = 3"],
                    "answer": "3",
                    "counterfactual.step": 0,
                    "counterfactual.steps": ["5 - 2 = 12 12"],
                    "counterfactual.answer": "12",
                }
            ],
            "the counterfactual row has",
        ),
        (
            [
                {
                    "prompt": "how many pens",
                    "steps": ["5 - 2 = 3"],
                    "answer": "3",
                    "counterfactual.step": 2,
                    "counterfactual.steps": ["5 - 2 = 6"],
                    "counterfactual.answer": "6",
                }
            ],
            "column 'counterfactual.step': 2 is not a step index (0..0)",
        ),
        (
            [{"prompt": "how many pens", "steps": ["5 - 2 = 3"], "rationale_paraphrase": ["5", "2"], "answer": "3"}],
            "column 'rationale_paraphrase': 2 steps, the rationale has 1",
        ),
    ],
)
def test_bad_rationales_are_one_line(tmp_path, tok, rows, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")) as err:
        TextTask(str(write_jsonl(tmp_path / "bad.jsonl", rows)), tok)
    assert "\n" not in str(err.value) and "bad.jsonl row 0" in str(err.value)


def test_a_chunk_cut_on_the_left_moves_its_step_spans(tmp_path, monkeypatch):
    """The audits cut their set into chunks and drop the padding columns: a left-padded chunk
    keeps its steps where its tokens are (-1, a step a row lacks, stays -1)."""
    from faithful_train.tasks.base import take
    from faithful_train.tasks.batch import trim_padding

    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    paths = write_arithmetic(tmp_path / "arith", seed=3, n_train=64, n_val=8, n_audit=64)
    task = TextTask(str(paths["train"]), str(paths["tokenizer"]), audit=str(paths["audit"]), padding_side="left")
    full = task.rows("audit", range(64))
    shortest = int(full["attention_mask"].sum(1).argmin())
    chunk = trim_padding(take(full, torch.tensor([shortest])))
    assert chunk["input_ids"].shape[1] < full["input_ids"].shape[1]  # the cut happened
    spans, ids = chunk["step_spans"][0], chunk["input_ids"][0]
    for j in range(int(chunk["n_steps"][0])):
        start, stop = spans[j].tolist()
        words = task.tokenizer.convert_ids_to_tokens(ids[start:stop].tolist())
        assert len(words) == 5 and words[3] == "="  # "a op b = y"
    assert (spans[int(chunk["n_steps"][0]) :] == -1).all()


def _without_counterfactuals(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    paths = write_arithmetic(tmp_path / "arith", seed=4, n_train=64, n_val=8, n_audit=64)
    bare = {}
    for split in ("train", "audit"):
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        keep = ("prompt", "steps", "conclusion", "answer")
        bare[split] = write_jsonl(tmp_path / f"{split}.jsonl", [{k: r[k] for k in keep} for r in rows])
    return bare, paths["tokenizer"]


def test_label_fn_writes_counterfactual_rationales_from_a_mistake(tmp_path, monkeypatch):
    bare, tokenizer = _without_counterfactuals(tmp_path, monkeypatch)
    spec = "faithful_train.tasks.arithmetic_text:continue_chain"
    task = TextTask(str(bare["train"]), str(tokenizer), audit=str(bare["audit"]), label_fn=spec)
    assert "counterfactual_steps" in task.provides
    from faithful_train.tasks.text.mistakes import with_mistakes

    rows = [json.loads(line) for line in bare["audit"].read_text().splitlines()]
    made = with_mistakes(rows, task.label_fn, task.tokenizer, "audit")
    assert made == with_mistakes(rows, task.label_fn, task.tokenizer, "audit")  # seeded: every load the same
    changed = set()
    for row in made:
        j, cf = row["counterfactual.step"], row["counterfactual.steps"]
        changed.add(j)
        assert cf[:j] == row["steps"][:j] and cf[j].split()[:4] == row["steps"][j].split()[:4]
        assert cf[j] != row["steps"][j]  # the mistake: step j's result
        for prev, step in zip(cf[j:], cf[j + 1 :]):  # the chain continued from it by label_fn
            a, op, b, _, y = step.split()
            assert int(a) == int(prev.split()[-1])
            assert int(y) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert row["counterfactual.answer"] == cf[-1].split()[-1]
    assert changed == {0, 1, 2, 3}
    # a planted model that copies the last step's result follows every mistake
    from faithful_train.audits.cot import CotAudit
    from tests.unit.audits.test_cot import CopyLastToken

    audit = CotAudit(n_examples=64, batch_size=32)
    audit.bind(CopyLastToken(task.vocab_size), task)
    found = audit.evaluate(CopyLastToken(task.vocab_size), task)
    assert found["follow_rate"] == 1.0 and found["original_rate"] == 0.0


def test_a_label_fn_may_give_only_the_answer(tmp_path, monkeypatch):
    bare, tokenizer = _without_counterfactuals(tmp_path, monkeypatch)
    (tmp_path / "labels.py").write_text(
        "def last_result(row):\n    return row['steps'][-1].split()[-1]\n"
        "def broken(row):\n    return {'steps': row['steps'][:1], 'answer': '3'}\n"
    )
    monkeypatch.chdir(tmp_path)
    task = TextTask(str(bare["train"]), str(tokenizer), audit=str(bare["audit"]), label_fn="labels.py:last_result")
    batch = task.rows("audit", range(64))
    corrupted, follow = task.counterfactual_evidence(batch, torch.Generator())
    last = batch["n_steps"] - 1
    for b in range(64):  # only a mistake in the last step moves this label_fn's answer
        if int(batch["cf_step"][b]) == int(last[b]):
            assert int(follow[b]) != int(batch["labels"][b])
        assert int((corrupted[b] != batch["input_ids"][b]).sum()) == 1  # one token: the mistake
    with pytest.raises(DataError, match=r"row 0: label_fn must return the answer, or \{'steps'"):
        TextTask(str(bare["train"]), str(tokenizer), label_fn="labels.py:broken")
    words = write_jsonl(tmp_path / "words.jsonl", [{"prompt": "Ana has", "steps": ["she buys", "more"], "answer": "3"}])
    with pytest.raises(DataError, match="row 0 column 'steps': no number in any step"):
        TextTask(str(words), str(tokenizer), label_fn="labels.py:last_result")
