"""The kv_retrieval task (``faithful_train/tasks/kv_retrieval.py``): documents, the gold one and its
distractors, and counterfactual evidence."""

import pytest
import torch

from faithful_train.tasks.kv_retrieval import KVRetrieval


def test_kv_retrieval_batches():
    task = KVRetrieval()
    batch = task.sample(16, 0)
    assert batch["input_ids"].shape == (16, 15)
    gold = batch["var/doc"]
    docs = batch["input_ids"][:, :12].view(16, 4, 3)
    chosen = docs[torch.arange(16), gold]
    assert (chosen[:, 0] == batch["input_ids"][:, -2]).all() and (chosen[:, 1] == batch["input_ids"][:, -1]).all()
    assert (chosen[:, 2] == batch["labels"]).all()
    assert ((batch["doc_kind"] == 0).sum(1) == 1).all() and (batch["doc_kind"].gather(1, gold[:, None]) == 0).all()
    same_key = batch["doc_kind"] == 1
    assert (docs[same_key][:, 1] == batch["input_ids"][:, -1]).all()  # a distractor with the query's key
    ids, new = task.counterfactual_evidence(batch, torch.Generator().manual_seed(0))
    assert (ids.view(16, 5, 3)[torch.arange(16), gold, 2] == new).all() and (new != batch["labels"]).all()
    with pytest.raises(ValueError):
        KVRetrieval(n_docs=2)
