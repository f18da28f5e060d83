"""Export: our dense transformer is a GPT-2 weight for weight (same logits, padded or not), and
checkpoints load without running code."""

from __future__ import annotations

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.io.checkpoints import load_checkpoint
from faithful_train.modeling.convert import to_gpt2
from tests.conftest import tiny_transformer


@pytest.mark.parametrize("tie", [False, True])
def test_dense_transformer_converts_to_gpt2_with_the_same_logits(tie, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_transformer(vocab_size=20, tie_embeddings=tie).eval()
    with torch.no_grad():  # trained-looking weights: biases and norms away from their init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    to_gpt2(model).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 20, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: positions from the mask on both sides
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        ours = model(ids, attention_mask=mask)
        torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-5, rtol=1e-5)


def test_moe_does_not_export():
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        to_gpt2(tiny_transformer(n_experts=4))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import os
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}))
    with pytest.raises(ConfigError, match="not a checkpoint that loads safely"):
        load_checkpoint(path)
    assert not marker.exists()
