"""The ``text`` task: files through ``datasets``, tokenization with offsets, spans, multi-token
answers, explicit counterfactual pairs and ``label_fn``, the cache, the seeded epoch stream, and
one-line errors for bad data."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import DataError, FaithfulError
from faithful_train.intervene.sites import SiteRef, resolve_positions
from faithful_train.tasks.text import TextTask
from tests.unit.text_rows import COLORS, color_rows, word_tokenizer, write_jsonl


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    rows = color_rows()
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", rows),
        "tokenizer": word_tokenizer(tmp_path / "tok"),
        "tmp": tmp_path,
    }


def test_batches_carry_padding_answers_spans_and_pairs(files):
    task = TextTask(str(files["train"]), str(files["tokenizer"]))
    batch = task.rows("train", [0, 1, 2])
    tok = task.tokenizer
    # row 0: "the color of the apple is" + "very red" -> input ends with "very", answer "very red"
    assert (
        tok.convert_ids_to_tokens(batch["input_ids"][0, : batch["attention_mask"][0].sum()].tolist())
        == "the color of the apple is very".split()
    )
    assert tok.convert_ids_to_tokens(batch["answer_ids"][0].tolist()) == ["very", "red"]
    assert batch["answer_pos"][0].tolist() == [5, 6] and batch["answer_mask"][0].tolist() == [True, True]
    assert batch["answer_mask"][1].tolist() == [True, False]  # row 1: one token
    assert batch["labels"].tolist() == batch["answer_ids"][:, 0].tolist()
    assert batch["span/thing"][0].tolist() == [4, 5] and batch["span/thing"][1].tolist() == [3, 4]
    assert batch["span/color_word"][0].tolist() == [1, 2]  # characters [4, 9) are "color"
    pairs = task.explicit_pairs(batch, ["thing"])
    source = pairs.sources["thing"]
    assert source["row"].tolist() == [task.splits["train"]["pairs"]["thing"][i] for i in (0, 1, 2)]
    assert source["input_ids"].shape == batch["input_ids"].shape  # padded together
    assert batch["irrelevant"][0, :4].tolist() == [True, False, False, False]  # the first "the" only
    assert task.provides == {"aligned_perturbations", "irrelevant", "concepts"} - (
        set() if task.concepts else {"concepts"}
    )


def test_left_padding_moves_positions_with_the_tokens(files):
    right = TextTask(str(files["train"]), str(files["tokenizer"]))
    left = TextTask(str(files["train"]), str(files["tokenizer"]), padding_side="left")
    a, b = right.rows("train", [0, 1]), left.rows("train", [0, 1])
    for row in range(2):
        ra, rb = a["attention_mask"][row].bool(), b["attention_mask"][row].bool()
        assert torch.equal(a["input_ids"][row, ra], b["input_ids"][row, rb])
        shift = int(rb.long().argmax())
        assert torch.equal(b["answer_pos"][row], a["answer_pos"][row] + shift)
        assert torch.equal(b["span/thing"][row], a["span/thing"][row] + shift)
    ref = SiteRef.parse({"site": "embed", "positions": {"span": "thing", "token": "last"}})
    ids = lambda batch: batch["input_ids"].gather(1, resolve_positions(ref, batch))  # noqa: E731
    assert torch.equal(ids(a), ids(b))
    for spec in ("last", "answer-1", [0]):
        ref = SiteRef.parse({"site": "embed", "positions": spec})
        assert torch.equal(ids(a), ids(b))


def test_label_fn_gives_counterfactual_answers(files):
    (files["tmp"] / "colors.py").write_text(
        "COLORS = " + repr(COLORS) + "\ndef color(v):\n    return COLORS[v['thing']]\n"
    )
    rows = [r for i, r in enumerate(color_rows()) if i % 3]  # one-token answers only
    path = write_jsonl(
        files["tmp"] / "short.jsonl",
        [{k: v for k, v in r.items() if k not in ("source", "counterfactual_answer")} for r in rows],
    )
    task = TextTask(str(path), str(files["tokenizer"]), label_fn=str(files["tmp"] / "colors.py") + ":color")
    base = task.rows("train", [0, 1])
    source = task.rows("train", [1, 0])
    ids, mask = task.counterfactual_answers(base, source, ["thing"])
    assert ids[:, 0].tolist() == source["labels"].tolist() and mask.all()


def test_cache_is_used_on_the_second_load(files, monkeypatch):
    TextTask(str(files["train"]), str(files["tokenizer"]))
    assert list((files["tmp"] / "cache").glob("*.pt"))
    import faithful_train.tasks.text.task as text

    monkeypatch.setattr(text, "read_rows", lambda *a: pytest.fail("the file was read again"))
    TextTask(str(files["train"]), str(files["tokenizer"]))


def test_training_stream_is_a_seeded_function_of_the_batch_index(files):
    task = TextTask(str(files["train"]), str(files["tokenizer"]))
    first = [task.train_batch(k, 4, seed=3)["row"].tolist() for k in range(8)]
    again = [task.train_batch(k, 4, seed=3)["row"].tolist() for k in range(8)]
    assert first == again
    assert sorted(sum(first[:4], [])) == list(range(16))  # an epoch covers every row once
    assert first[:4] != first[4:]  # the next epoch is another permutation


def _bad(tmp_path, rows):
    return write_jsonl(tmp_path / "bad.jsonl", rows)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.__setitem__("answer", None), "row 0 column 'answer': empty answer"),
        (lambda r: r["spans"].__setitem__("thing", "pear"), "row 0 column 'spans.thing': 'pear' is not in the prompt"),
        (lambda r: r.__setitem__("answer", " "), "row 0 column 'answer'"),
        (lambda r: r["source"].__setitem__("thing", 99), "row 0 column 'source.thing'"),
    ],
)
def test_bad_rows_name_file_row_and_column(files, change, message):
    rows = color_rows()
    change(rows[0])
    with pytest.raises(DataError, match=message):
        TextTask(str(_bad(files["tmp"], rows)), str(files["tokenizer"]))


def test_a_column_no_row_has(files):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in color_rows()]
    with pytest.raises(DataError, match="no column 'answer'; columns: "):
        TextTask(str(_bad(files["tmp"], rows)), str(files["tokenizer"]))


def test_missing_file_and_missing_tokenizer(files):
    with pytest.raises(DataError, match="task.train: file not found"):
        TextTask(str(files["tmp"] / "nope.jsonl"), str(files["tokenizer"]))
    (files["tmp"] / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer in"):
        TextTask(str(files["train"]), str(files["tmp"] / "empty"))


def test_prompt_longer_than_the_context_names_the_row(files):
    task = TextTask(str(files["train"]), str(files["tokenizer"]))
    with pytest.raises(DataError, match="row 0 column 'prompt': 7 tokens"):
        task.check_context(5)


def test_csv_and_parquet_read_the_same_rows(files):
    import datasets

    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in color_rows()]
    data = datasets.Dataset.from_list(rows)
    data.to_csv(str(files["tmp"] / "rows.csv"))
    data.to_parquet(str(files["tmp"] / "rows.parquet"))
    tokens = [
        TextTask(str(files["tmp"] / f"rows.{ext}"), str(files["tokenizer"])).splits["train"]["tokens"]
        for ext in ("csv", "parquet")
    ]
    assert tokens[0] == tokens[1] == TextTask(str(files["train"]), str(files["tokenizer"])).splits["train"]["tokens"]


def test_unknown_variable_names_its_column(files):
    task = TextTask(str(files["train"]), str(files["tokenizer"]))
    with pytest.raises(FaithfulError, match="variables.color"):
        task.check_variables(["color"])
