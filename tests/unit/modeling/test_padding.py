"""Padding invariance: an example gets the same answer logits however it is padded (left, right or
not at all), on our transformer, gpt2 and llama; and the helpers that read answers."""

from __future__ import annotations

import pytest
import torch

from faithful_train.functional.losses import answer_forward, answer_loss, exact_match
from faithful_train.modeling.hf import HFAdapter
from faithful_train.tasks.batch import gather_positions, trim_padding
from tests.conftest import tiny_transformer

VOCAB = 20
LENGTHS = [3, 7, 5, 1]


def _models():
    yield "ours", tiny_transformer(vocab_size=VOCAB).eval()
    yield "ours-moe", tiny_transformer(vocab_size=VOCAB, n_experts=4).eval()
    gpt2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    yield "gpt2", HFAdapter.from_config("gpt2", gpt2, vocab_size=VOCAB, seed=0).eval()
    llama = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    yield "llama", HFAdapter.from_config("llama", llama, vocab_size=VOCAB, seed=0).eval()


def _padded(examples: list[torch.Tensor], side: str, pad: int = 0) -> dict[str, torch.Tensor]:
    T = max(len(x) for x in examples) + (2 if side == "right" else 0)  # extra padding on the right too
    ids = torch.full((len(examples), T), pad)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    positions = []
    for b, x in enumerate(examples):
        start = T - len(x) if side == "left" else 0
        ids[b, start : start + len(x)] = x
        mask[b, start : start + len(x)] = 1
        positions.append(start + len(x) - 1)
    return {"input_ids": ids, "attention_mask": mask, "answer_pos": torch.tensor(positions)[:, None]}


@pytest.mark.parametrize("name, model", list(_models()), ids=[n for n, _ in _models()])
def test_answer_logits_do_not_depend_on_padding(name, model):
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    with torch.no_grad():
        alone = torch.cat([model(x[None])[:, -1] for x in examples])
        for side in ("left", "right"):
            batch = _padded(examples, side, pad=int(torch.randint(0, VOCAB, (1,), generator=g)))
            full = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            torch.testing.assert_close(gather_positions(full, batch["answer_pos"])[:, 0], alone, atol=1e-5, rtol=1e-5)
            read = model(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["answer_pos"])
            torch.testing.assert_close(read[:, 0], alone, atol=1e-5, rtol=1e-5)
            # every real position, not only the answer's
            for b, x in enumerate(examples):
                real = batch["attention_mask"][b].bool()
                torch.testing.assert_close(full[b, real], model(x[None])[0], atol=1e-5, rtol=1e-5)


def test_answer_forward_tiles_padding_and_positions_for_stacked_variants():
    model = tiny_transformer(vocab_size=VOCAB).eval()
    examples = [torch.randint(1, VOCAB, (n,)) for n in LENGTHS]
    batch = _padded(examples, "left")
    with torch.no_grad():
        once = answer_forward(model, batch)
        twice = answer_forward(model, batch, batch["input_ids"].repeat(2, 1))
    assert once.shape == (4, 1, VOCAB) and twice.shape == (8, 1, VOCAB)
    torch.testing.assert_close(twice[4:], once)


def test_multi_token_answer_loss_and_exact_match_count_only_real_slots():
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = logits[0, 1, 2] = 5.0  # row 0: tokens 1, 2 right; slot 2 empty
    logits[1, 0, 1] = logits[1, 1, 0] = logits[1, 2, 3] = 5.0  # row 1: second token wrong
    targets = torch.tensor([[1, 2, 0], [1, 2, 3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert exact_match(logits, targets, mask).tolist() == [1.0, 0.0]
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    torch.testing.assert_close(answer_loss(logits, targets, mask), per_token[mask.flatten()].mean())


def test_trim_padding_cuts_shared_padding_and_moves_positions():
    batch = _padded([torch.tensor([5, 6]), torch.tensor([7, 8, 9])], "left")
    wide = {
        k: torch.nn.functional.pad(v, (2, 0)) if k in ("input_ids", "attention_mask") else v + 2
        for k, v in batch.items()
    }
    trimmed = trim_padding(wide)
    assert torch.equal(trimmed["input_ids"], batch["input_ids"]) and torch.equal(
        trimmed["answer_pos"], batch["answer_pos"]
    )


def test_teacher_forcing_writes_a_counterfactual_answer_where_the_model_reads_it():
    from faithful_train.functional.interchange import interchange_hits, teacher_forced

    # prompt "5 6" + answer "7 8" (input "5 6 7", pad): the token at position 2 is answer token 0
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [4, 5, 6, 9]]),
        "answer_pos": torch.tensor([[1, 2], [2, 3]]),
        "answer_mask": torch.tensor([[True, True], [True, False]]),
        "labels": torch.tensor([7, 9]),
    }
    forced = teacher_forced(batch, torch.tensor([[3, 2], [1, 0]]))
    assert forced.tolist() == [[5, 6, 3, 0], [4, 5, 6, 9]]  # row 1's answer has one token: nothing to write
    logits = torch.zeros(2, 2, 10)
    logits[0, 0, 3] = logits[0, 1, 2] = logits[1, 0, 1] = 1.0
    hits = interchange_hits(logits, torch.tensor([[3, 2], [1, 0]]), batch["answer_mask"])
    assert hits.tolist() == [1.0, 1.0]
    logits[0, 1, 2] = 0.0  # the second token wrong: the whole answer is wrong
    assert interchange_hits(logits, torch.tensor([[3, 2], [1, 0]]), batch["answer_mask"]).tolist() == [0.0, 1.0]
