"""Documents and tool calls read from a text file (the ``documents`` and ``tool_calls`` columns):
spans, kinds, tool tokens and counterfactual rows, the retrieval and tools audits on them, and
one-line errors for bad columns."""

from __future__ import annotations

import pytest
import torch

from faithful_train.audits.retrieval import RetrievalAudit
from faithful_train.audits.tools import ToolsAudit
from faithful_train.errors import ConfigError, DataError
from faithful_train.intervene import evidence
from faithful_train.tasks.batch import tool_call
from faithful_train.tasks.text import TextTask
from tests.unit.evidence_rows import WORDS, document_rows, tool_rows
from tests.unit.text_rows import word_tokenizer, write_jsonl


@pytest.fixture
def tok(tmp_path, monkeypatch):
    monkeypatch.setenv("FAITHFUL_TRAIN_CACHE", str(tmp_path / "cache"))
    return str(word_tokenizer(tmp_path / "tok", WORDS))


@pytest.mark.parametrize("side", ["right", "left"])
def test_documents_become_spans_kinds_and_counterfactual_rows(tmp_path, tok, side):
    rows = document_rows()
    rows[0]["documents"][0] = "sky is blue and the color of grass is green"  # rows of other lengths: padding
    rows[0]["gold_document"] = 1
    rows[0]["prompt"], rows[0]["answer"] = (
        f"the color of {rows[0]['documents'][1].split()[0]} is",
        rows[0]["documents"][1].split()[-1],
    )
    rows[0]["counterfactual"] = {"document": f"{rows[0]['documents'][1].split()[0]} is red", "answer": "red"}
    task = TextTask(str(write_jsonl(tmp_path / "docs.jsonl", rows)), tok, padding_side=side)
    assert {"documents", "counterfactual_evidence"} <= task.provides and "tool_calls" not in task.provides
    assert task.spans == ("doc0", "doc1", "doc2")
    batch = task.rows("train", range(8))
    ids = batch["input_ids"]
    decode = task.tokenizer.convert_ids_to_tokens
    for b in range(8):
        for j in range(3):
            start, stop = batch[f"span/doc{j}"][b].tolist()
            assert " ".join(decode(ids[b, start:stop].tolist())) == rows[b]["documents"][j]
        assert batch["doc_kind"][b, rows[b]["gold_document"]] == 0 and (batch["doc_kind"][b] == 0).sum() == 1
    cf, answers = task.counterfactual_evidence(batch, torch.Generator())
    gold = batch["doc_kind"].eq(0).long().argmax(1)
    spans = evidence.document_spans(batch, 3)[torch.arange(8), gold]
    inside = evidence.in_spans(spans, ids.shape[1])
    assert ((cf != ids) <= inside).all() and (cf != ids).any(1).all()  # only the gold document changed
    assert decode(answers.tolist()) == [r["counterfactual"]["answer"] for r in rows[:8]]


def test_tool_calls_become_tool_tokens_results_and_counterfactuals(tmp_path, tok):
    rows = tool_rows()
    task = TextTask(str(write_jsonl(tmp_path / "tools.jsonl", rows)), tok)
    assert {"tool_calls", "counterfactual_evidence"} <= task.provides
    assert task.tool_tokens == (task.tokenizer.convert_tokens_to_ids("lookup"),)
    batch = task.rows("train", range(6))
    positions, tools = tool_call(batch)
    assert (batch["input_ids"][torch.arange(6), positions + 1] == tools).all()
    result = batch["span/result"]
    decode = task.tokenizer.convert_ids_to_tokens
    assert [decode(batch["input_ids"][b, result[b, 0]].item()) for b in range(6)] == [
        r["tool_calls"][0]["result"] for r in rows[:6]
    ]
    cf, answers = task.counterfactual_evidence(batch, torch.Generator())
    changed = (cf != batch["input_ids"]).nonzero()
    assert set(changed[:, 1].tolist()) == {
        int(result[0, 0]),
        int(result[0, 0]) + 1,
    }  # the result, the teacher-forced answer
    assert decode(answers.tolist()) == [r["tool_calls"][0]["counterfactual_result"] for r in rows[:6]]


def test_both_audits_run_on_text_rows(tmp_path, tok):
    from tests.conftest import tiny_transformer

    docs = TextTask(str(write_jsonl(tmp_path / "docs.jsonl", document_rows())), tok)
    model = tiny_transformer(vocab_size=docs.vocab_size, max_seq_len=32)
    audit = RetrievalAudit(n_examples=16, batch_size=8, surrogate_ablations=8)
    audit.bind(model, docs)
    figures = audit.evaluate(model, docs)
    assert set(figures) <= set(audit.metric_names(docs)) and {
        "reliance_acc",
        "surrogate_top1",
        "counterfactual_follow",
    } <= set(figures)
    assert 0 <= figures["counterfactual_follow"] <= 1 and figures["consulted/gold"] > 0
    tools = TextTask(str(write_jsonl(tmp_path / "tools.jsonl", tool_rows())), tok)
    audit = ToolsAudit(n_examples=16, batch_size=8)
    audit.bind(model, tools)
    figures = audit.evaluate(model, tools)
    assert figures["selection_acc"] == 1.0  # one tool: always the right one among the tools
    assert set(figures) == set(audit.metric_names(tools))


def test_a_text_file_without_documents_is_named(tmp_path, tok):
    from tests.conftest import tiny_transformer

    task = TextTask(str(write_jsonl(tmp_path / "tools.jsonl", tool_rows())), tok)
    with pytest.raises(ConfigError, match=r"needs a 'documents' column in .*tools.jsonl"):
        RetrievalAudit().bind(tiny_transformer(vocab_size=task.vocab_size), task)


@pytest.mark.parametrize(
    "make, edit, message",
    [
        (
            document_rows,
            lambda r: r[3].update(documents="apple is red"),
            r"row 3 column 'documents': a list of non-empty texts",
        ),
        (
            document_rows,
            lambda r: r[2].update(documents=["apple is red"]),
            r"row 2 column 'documents': 1 documents, but row 0 has 3",
        ),
        (
            document_rows,
            lambda r: r[1].update(gold_document=7),
            r"row 1 column 'gold_document': 7 is not a document index",
        ),
        (
            document_rows,
            lambda r: r[4]["counterfactual"].update(document="sky is very blue"),
            r"row 4 column 'counterfactual.document': the counterfactual row has",
        ),
        (
            tool_rows,
            lambda r: r[5]["tool_calls"][0].update(tool="calculator"),
            r"row 5 column 'tool_calls' item 0 'tool': 'calculator' is not a token",
        ),
        (
            tool_rows,
            lambda r: r[5]["tool_calls"][0].update(tool="lookup calc"),
            r"'lookup calc' is not a token of the tokenizer .* 2 tokens",
        ),
        (tool_rows, lambda r: r[2].update(tool_calls=[]), r"row 2 column 'tool_calls': a list of one call"),
    ],
)
def test_bad_documents_and_tool_calls_are_one_line(tmp_path, tok, make, edit, message):
    rows = make()
    edit(rows)
    with pytest.raises(DataError, match=message) as info:
        TextTask(str(write_jsonl(tmp_path / "bad.jsonl", rows)), tok)
    assert "\n" not in str(info.value)


def test_counterfactual_evidence_is_declared_by_what_a_task_implements(tmp_path, tok):
    from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
    from faithful_train.tasks.kv_retrieval import KVRetrieval
    from faithful_train.tasks.tool_use import ToolUse

    assert "counterfactual_evidence" in KVRetrieval().provides and "counterfactual_evidence" in ToolUse().provides
    plain = HierarchicalEquality()
    assert "counterfactual_evidence" not in plain.provides
    with pytest.raises(ConfigError, match="no counterfactual evidence"):
        plain.counterfactual_evidence(plain.sample(2, 0), torch.Generator())
    rows = document_rows()
    for row in rows:
        del row["counterfactual"]
    task = TextTask(str(write_jsonl(tmp_path / "docs.jsonl", rows)), tok)
    assert "counterfactual_evidence" not in task.provides
    with pytest.raises(ConfigError, match="needs a 'counterfactual.document"):
        task.counterfactual_evidence(task.rows("train", range(2)), torch.Generator())
