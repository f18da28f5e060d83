"""The retrieval audit, on planted models whose answers are known: a reader that
answers from the gold document, and a memoriser that answers from its table while its attention
still points at the gold document (consulted, not used)."""

import json

import pytest
import torch
from torch import nn

from faithful_train.audits.retrieval import KINDS, RetrievalAudit
from faithful_train.errors import ConfigError
from faithful_train.intervene import evidence
from faithful_train.modeling.hooks import HookPoint, SitePoint
from faithful_train.tasks.batch import gather_positions
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from faithful_train.tasks.kv_retrieval import KVRetrieval


class Planted(nn.Module):
    """One block whose attention from the last position puts all its mass on the document that
    matches the query. ``reads``: answer that document's value; else answer the task's table."""

    n_layers = 1

    def __init__(self, task: KVRetrieval, reads: bool):
        super().__init__()
        self.task, self.reads = task, reads
        self.hook_pattern = HookPoint()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        t = self.task
        B, T = input_ids.shape
        docs = input_ids[:, : 3 * t.n_docs].view(B, t.n_docs, 3)
        entity, key = input_ids[:, -2], input_ids[:, -1]
        match = (docs[..., 0] == entity[:, None]) & (docs[..., 1] == key[:, None])  # (B, k)
        pattern = torch.full((B, 1, T, T), 1.0 / T)
        target = 3 * match.float().argmax(1) + 2  # the matching document's value token
        pattern[torch.arange(B), 0, -1] = torch.nn.functional.one_hot(target, T).float()
        pattern = self.hook_pattern(pattern)
        read = (pattern[:, 0, -1] * input_ids.float()).sum(1).long()  # the attended token
        found = match.any(1)
        if self.reads:
            answer = torch.where(found, read, t.filler_token)
        else:
            answer = (
                t.first_value + t.table[entity.clamp_max(t.n_entities - 1), (key - t.first_key).clamp(0, t.n_keys - 1)]
            )
        logits = torch.zeros(B, T, t.vocab_size)
        logits[:, -1] = self.scale * torch.nn.functional.one_hot(answer, t.vocab_size).float()
        return logits if positions is None else gather_positions(logits, positions)

    def site_points(self):
        return {"blocks.0.attn.pattern": SitePoint(self.hook_pattern)}


def _run(reads):
    task = KVRetrieval(parametric=True)
    model = Planted(task, reads)
    audit = RetrievalAudit(n_examples=64, batch_size=32)
    audit.bind(model, task)
    return audit, model, task, audit.evaluate(model, task)


def test_a_reader_uses_what_it_consults():
    audit, model, task, figures = _run(reads=True)
    assert figures["task_acc"] == 1.0
    assert figures["reliance_acc"] == 1.0
    assert figures["counterfactual_follow"] == 1.0
    assert figures["consulted_used_top1"] == 1.0
    assert figures["consulted/gold"] == pytest.approx(1.0)  # all the mass on its value token
    assert figures["used/gold"] > 5 and figures["used/same_key"] == pytest.approx(0.0)
    assert figures["used_removed/gold"] > 5 and figures["removed_filled_top1"] == 1.0
    assert figures["distractor_reliance"] == pytest.approx(0.0)


def test_a_memoriser_consults_the_gold_document_but_does_not_use_it(tmp_path):
    audit, model, task, figures = _run(reads=False)
    assert figures["task_acc"] == 1.0  # parametric: the table states what the documents state
    assert figures["consulted/gold"] == pytest.approx(1.0)
    assert figures["used/gold"] == pytest.approx(0.0)
    assert figures["reliance_acc"] == 0.0 and figures["consulted_used_top1"] == 0.0
    assert figures["counterfactual_follow"] == 0.0
    audit.write_artifacts(model, task, tmp_path, 5, [])
    records = [json.loads(line) for line in (tmp_path / "provenance" / "step000005.jsonl").read_text().splitlines()]
    assert len(records) == 64 * 4
    gold = [r for r in records if r["kind"] == "gold"]
    assert all(r["consulted"] > 0.3 and r["used"] == 0 for r in gold)


def test_documents_are_required():
    from tests.conftest import tiny_transformer

    with pytest.raises(ConfigError, match="documents"):
        RetrievalAudit().bind(tiny_transformer(), HierarchicalEquality())


def test_on_our_transformer_every_document_runs_in_one_forward():
    from tests.conftest import tiny_transformer

    task = KVRetrieval()
    model = tiny_transformer(vocab_size=task.vocab_size, max_seq_len=task.seq_len)
    calls = []
    model.hook_embed.register_forward_hook(lambda _m, args, out: calls.append(out.shape[0]))
    audit = RetrievalAudit(n_examples=16, batch_size=16)
    audit.bind(model, task)
    figures = audit.evaluate(model, task)
    assert calls == [16, 16 * (9 + 32)]  # the clean forward, then 4 filled + 1 counterfactual + 4 removed + 32 subsets
    # removing a document equals running the shorter sequence alone (positions close up)
    batch = task.sample(4, 1)
    ids, mask = evidence.remove(batch["input_ids"], None, batch["span/doc1"], task.filler_token)
    short = torch.cat([batch["input_ids"][:, :3], batch["input_ids"][:, 6:]], 1)
    torch.testing.assert_close(model(ids, attention_mask=mask)[:, -1], model(short)[:, -1], atol=1e-5, rtol=1e-5)
    assert set(figures) == set(audit.metric_names(task))


class EitherDocument(nn.Module):
    """Answers the gold value while the gold document *or* the same-key distractor is intact:
    two documents that each suffice. Leaving one out changes nothing; only subsets see both."""

    n_layers = 1

    def __init__(self, task: KVRetrieval):
        super().__init__()
        self.task = task
        self.hook_pattern = HookPoint()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, input_ids, attention_mask=None, positions=None, narrow=True):
        t = self.task
        B, T = input_ids.shape
        docs = input_ids[:, -3 - 3 * t.n_docs : -3].view(B, t.n_docs, 3)
        entity, key = input_ids[:, -2], input_ids[:, -1]
        gold = (docs[..., 0] == entity[:, None]) & (docs[..., 1] == key[:, None])
        same_key = (docs[..., 0] != entity[:, None]) & (docs[..., 1] == key[:, None])
        self.hook_pattern(torch.full((B, 1, T, T), 1.0 / T))
        value = (docs[..., 2] * gold).sum(1)
        known = gold.any(1)
        either = gold.any(1) | same_key.any(1)
        answer = t.first_value + t.table[entity.clamp_max(t.n_entities - 1), (key - t.first_key).clamp(0, t.n_keys - 1)]
        answer = torch.where(known, value, answer)
        logits = torch.zeros(B, T, t.vocab_size)
        logits[:, -1] = torch.where(
            either[:, None], self.scale * torch.nn.functional.one_hot(answer, t.vocab_size).float(), 0.0
        )
        return logits if positions is None else gather_positions(logits, positions)

    def site_points(self):
        return {"blocks.0.attn.pattern": SitePoint(self.hook_pattern)}


def test_the_surrogate_sees_documents_that_each_suffice(tmp_path):
    task = KVRetrieval(parametric=True)
    model = EitherDocument(task)
    audit = RetrievalAudit(n_examples=32, batch_size=32, surrogate_ablations=64)
    audit.bind(model, task)
    figures = audit.evaluate(model, task)
    assert figures["used/gold"] == pytest.approx(0.0) and figures["used/same_key"] == pytest.approx(0.0)
    assert figures["reliance_acc"] == 0.0  # leave-one-out sees no document needed
    assert figures["surrogate_r2"] > 0.5
    audit.write_artifacts(model, task, tmp_path, 1, [])
    records = [json.loads(line) for line in (tmp_path / "provenance" / "step000001.jsonl").read_text().splitlines()]
    weight = {
        kind: sum(r["surrogate"] for r in records if r["kind"] == kind) / sum(r["kind"] == kind for r in records)
        for kind in KINDS
    }
    assert weight["gold"] > 1.0 and weight["same_key"] > 1.0  # both matter, each alone does not
    assert abs(weight["near_duplicate"]) < 0.3 and abs(weight["other"]) < 0.3
