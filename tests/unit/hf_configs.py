"""Shared by the Hugging Face adapter's tests and the router objective's: tiny configs of every
supported family (two layers; ``qwen2_moe``'s layer 1 dense)."""

VOCAB, D, HEADS, EXPERTS, TOP_K = 50, 32, 4, 4, 2
_LLAMA = dict(
    hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=64
)
CONFIGS = {
    "gpt2": dict(n_embd=D, n_layer=2, n_head=HEADS, n_inner=64, n_positions=16, bos_token_id=0, eos_token_id=0),
    "llama": _LLAMA,
    "mixtral": dict(_LLAMA, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    # layer 1 is dense: it must have no moe sites
    "qwen2_moe": dict(
        _LLAMA,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],
    ),
    "olmoe": dict(_LLAMA, num_experts=EXPERTS, num_experts_per_tok=TOP_K, norm_topk_prob=True, eos_token_id=0),
}
