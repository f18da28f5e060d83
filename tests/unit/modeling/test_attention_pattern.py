"""Attention as a site: ``blocks.{i}.attn.pattern`` (B, H, T, T). Our transformer computes it
explicitly only when it is recorded or edited (otherwise attention stays fused, with the same
logits); Hugging Face models run it through our eager attention, equal to their own."""

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.intervene.engine import per_variant, run_variants
from faithful_train.intervene.sites import SiteRef, hooked, run_with
from faithful_train.modeling.hf import HFAdapter
from tests.conftest import tiny_transformer


def _batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def test_recording_the_pattern_keeps_the_logits_and_gives_causal_probabilities():
    model = tiny_transformer()
    ids, mask = _batch()
    fused = model(ids, attention_mask=mask)
    logits, cache = run_with(model, ids, record=["blocks.0.attn.pattern", "blocks.1.attn.pattern"], attention_mask=mask)
    torch.testing.assert_close(logits, fused, atol=1e-5, rtol=1e-5)
    pattern = cache["blocks.0.attn.pattern"]
    assert pattern.shape == (3, 4, 6, 6)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, 4, 6))
    assert pattern.triu(1).abs().max() == 0  # nothing attends to the future
    assert pattern[0, :, 2:, :2].abs().max() == 0  # nor to padding


def test_the_last_block_read_at_a_few_positions_has_a_pattern_of_those_queries():
    model = tiny_transformer()
    ids, mask = _batch()
    read = torch.full((3, 1), 5)
    with hooked(model, record=["blocks.1.attn.pattern"]) as cache:
        model(ids, attention_mask=mask, positions=read)
    assert cache["blocks.1.attn.pattern"].shape == (3, 4, 1, 6)


def test_editing_the_pattern_changes_what_the_heads_read():
    model = tiny_transformer()
    ids, mask = _batch()
    with hooked(model, record=["blocks.0.attn.heads"], edits={"blocks.0.attn.pattern": lambda p: p * 0}) as cache:
        edited = model(ids, attention_mask=mask)
    assert cache["blocks.0.attn.heads"].abs().max() == 0  # no attention: every head outputs 0
    assert not torch.allclose(edited, model(ids, attention_mask=mask))
    with hooked(model, edits={"blocks.0.attn.pattern": lambda p: p}):  # an identity edit changes nothing
        torch.testing.assert_close(
            model(ids, attention_mask=mask), model(ids, attention_mask=mask), atol=1e-5, rtol=1e-5
        )


def test_patching_the_pattern_runs_batched_in_the_engine():
    """Variant k takes head k's pattern of block 1 from a source input: the same as one
    hooked forward per variant."""
    model = tiny_transformer()
    ids, mask = _batch()
    source = torch.randint(0, 20, (3, 6))
    _, src = run_with(model, source, record=["blocks.1.attn.pattern"], attention_mask=mask)
    src = src["blocks.1.attn.pattern"].detach()

    def take_head(h):
        return lambda p: torch.cat([p[:, :h], src[:, h : h + 1], p[:, h + 1 :]], 1)

    batch = {"input_ids": ids, "attention_mask": mask}
    stacked = run_variants(
        model, batch, 4, {"blocks.1.attn.pattern": per_variant({h: take_head(h) for h in range(4)}, 3)}
    )
    for h in range(4):
        with hooked(model, edits={"blocks.1.attn.pattern": take_head(h)}):
            alone = model(ids, attention_mask=mask)[:, -1:]
        torch.testing.assert_close(stacked[3 * h : 3 * h + 3], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "family, config",
    [
        ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, n_positions=16)),
        ("llama", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, max_position_embeddings=16)),  # grouped-query attention
    ],
)  # fmt: skip
def test_hugging_face_patterns_equal_their_own_attentions(family, config):
    model = HFAdapter.from_config(family, config, vocab_size=30, seed=0).eval()
    ids = torch.randint(0, 30, (3, 6))
    plain = model(ids)
    logits, cache = run_with(model, ids, record=["blocks.1.attn.pattern"])
    torch.testing.assert_close(logits, plain)
    reference = model.hf_model(input_ids=ids, output_attentions=True).attentions[1]
    torch.testing.assert_close(cache["blocks.1.attn.pattern"], reference)
    with hooked(model, record=["blocks.1.attn.heads"], edits={"blocks.1.attn.pattern": lambda p: p * 0}) as edited:
        model(ids)
    assert edited["blocks.1.attn.heads"].abs().max() == 0


def test_the_pattern_is_narrowed_by_keys_only():
    with pytest.raises(ConfigError, match="not positions or heads"):
        SiteRef("blocks.0.attn.pattern", positions=(1,)).mask((2, 4, 6, 6))
    assert SiteRef("blocks.0.attn.pattern", dims=(0, 2)).mask((2, 4, 6, 6)).shape == (1, 4, 6, 6)
