"""``faithful_train.load_model`` and ``wrap``: a model with the canonical sites from a
save_pretrained folder, or from a Hugging Face model already in memory."""

import torch


def test_load_model_reads_a_save_pretrained_directory_and_wrap_takes_a_model(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    import faithful_train
    from faithful_train.intervene.sites import run_with

    hf = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=30, n_positions=16, bos_token_id=None, eos_token_id=None)
    )
    hf.save_pretrained(tmp_path)
    loaded, wrapped = faithful_train.load_model(tmp_path), faithful_train.wrap(hf.eval())
    ids = torch.randint(0, 30, (2, 5))
    assert torch.allclose(loaded(ids), wrapped(ids), atol=1e-6)
    _, cache = run_with(loaded, ids, record=["blocks.0.resid_post"])
    assert cache["blocks.0.resid_post"].shape == (2, 5, 16)
