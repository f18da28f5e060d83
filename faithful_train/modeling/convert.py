"""Our dense transformer as a Hugging Face GPT-2, weight for weight, so a model trained here loads
anywhere ``transformers`` does (``faithful-train export``).

The architectures match: pre-norm blocks (LayerNorm, eps 1e-5), fused q/k/v projection, exact
GELU (``activation_function: gelu``), learned position embeddings, a bias-free unembedding
(``tie_word_embeddings`` as configured). GPT-2's ``Conv1D`` stores weights as ``(in, out)``,
the transpose of ``nn.Linear``'s. Mixture-of-experts blocks have no GPT-2 counterpart.
"""

from __future__ import annotations

import torch

from faithful_train.errors import ConfigError
from faithful_train.modeling.transformer import Transformer


def to_gpt2(model: Transformer):
    """A ``GPT2LMHeadModel`` computing the same logits as ``model`` (dense only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    if cfg.n_experts:
        raise ConfigError("export: a mixture-of-experts transformer has no GPT-2 counterpart; only dense models export")
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT-2's 50256 lies outside our vocabularies
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = GPT2LMHeadModel(config).eval()
    own = model.state_dict()
    new = {
        "transformer.wte.weight": own["tok_emb.weight"],
        "transformer.wpe.weight": own["pos_emb.weight"],
        "transformer.ln_f.weight": own["ln_f.weight"],
        "transformer.ln_f.bias": own["ln_f.bias"],
        "lm_head.weight": own["unembed.weight"],
    }
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            new[f"{theirs}{b}.weight"], new[f"{theirs}{b}.bias"] = own[f"{ours}{a}.weight"], own[f"{ours}{a}.bias"]
        for a, b in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.up", "mlp.c_fc"),
            ("mlp.down", "mlp.c_proj"),
        ):
            new[f"{theirs}{b}.weight"] = own[f"{ours}{a}.weight"].T.contiguous()
            new[f"{theirs}{b}.bias"] = own[f"{ours}{a}.bias"]
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict(new, strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 conversion left weights unset: {missing[:3]} {unexpected[:3]}")
    return hf
