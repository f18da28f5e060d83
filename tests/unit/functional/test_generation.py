"""Generation: batched and left-padded equals one row at a time (greedy, logits to 1e-5) for our
transformer and Hugging Face models (their own ``generate``); a seeded sampling setting repeats
itself; bad settings are one line."""

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.functional.generation import Sampling, generate, next_token
from faithful_train.modeling.hf import HFAdapter
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from tests.unit.hf_configs import CONFIGS, VOCAB


def make(name):
    torch.manual_seed(0)
    if name == "ours":
        return Transformer(TransformerConfig(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, d_mlp=64)).eval()
    return HFAdapter.from_config(name, CONFIGS[name], vocab_size=VOCAB, seed=0).eval()


@pytest.mark.parametrize("name", ["ours", "gpt2", "llama"])
def test_batched_padded_generation_equals_one_row_at_a_time(name):
    model = make(name)
    ids = torch.randint(1, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 4:], mask[1, 5:] = 0, 0  # right-padded rows of 4, 5 and 6 tokens
    greedy = Sampling(max_new_tokens=5)
    tokens, logits = generate(model, ids, mask, greedy)
    assert tokens.shape == (3, 5) and logits.shape == (3, 5, VOCAB)
    for b in range(3):
        alone, alone_logits = generate(model, ids[b : b + 1, : int(mask[b].sum())], None, greedy)
        assert torch.equal(alone[0], tokens[b])
        assert (alone_logits[0] - logits[b]).abs().max() < 1e-5
    assert torch.equal(tokens, logits.argmax(-1))  # greedy: each token is its step's argmax
    hot = Sampling(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=5)
    first, _ = generate(model, ids, mask, hot)
    again, _ = generate(model, ids, mask, hot)
    other, _ = generate(model, ids, mask, Sampling(temperature=1.0, top_p=0.9, seed=4, max_new_tokens=5))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {
        int(next_token(logits, Sampling(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(s)))
        for s in range(200)
    }
    assert drawn == {0, 1}  # 0.5 + 0.3 reach 0.7: the last two never come


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="temperature -1 < 0"):
        Sampling(temperature=-1)
    with pytest.raises(ConfigError, match="top_p 0 is not in"):
        Sampling(top_p=0)
