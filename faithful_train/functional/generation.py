"""Generation: batched, left-padded sampling with explicit settings, the same for every model.

``Sampling(temperature, top_p, seed, max_new_tokens)``: ``temperature = 0`` is greedy; otherwise
the next token is drawn from ``softmax(logits / temperature)`` restricted to the smallest set of
tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al. 2020), with a
``torch.Generator`` seeded by ``seed`` (the global random state is left alone). A Hugging Face
model generates with its own ``generate`` (the same settings, under ``torch.random.fork_rng``
seeded by ``seed``); ours with ``sample`` below, one full forward per new token.

Rows are left-padded before generating, so every row's next token is read at the last position;
our transformer's positions count real tokens only, so padding does not move a row's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError
from faithful_train.modeling.interface import hugging_face_model


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling temperature {self.temperature} < 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p {self.top_p} is not in (0, 1]")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling max_new_tokens {self.max_new_tokens} < 1")

    @classmethod
    def parse(cls, spec: Any, where: str) -> Sampling:
        if not isinstance(spec, dict) and not hasattr(spec, "keys"):
            raise ConfigError(
                f"{where}: a sampling setting is {{temperature, top_p, seed, max_new_tokens}}, got {spec!r}"
            )
        unknown = set(spec) - {"temperature", "top_p", "seed", "max_new_tokens"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (temperature, top_p, seed, max_new_tokens)")
        try:
            return cls(**{k: spec[k] for k in spec})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def left_padded(input_ids: Tensor, attention_mask: Tensor | None, pad_id: int) -> tuple[Tensor, Tensor]:
    """The rows moved to the right end (padding on the left), and their mask."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    T = input_ids.shape[1]
    ids = torch.full_like(input_ids, pad_id)
    new_mask = torch.zeros_like(attention_mask)
    for b in range(input_ids.shape[0]):
        n = int(lengths[b])
        ids[b, T - n :] = input_ids[b, mask[b]]
        new_mask[b, T - n :] = 1
    return ids, new_mask


def next_token(logits: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """``(B,)``: greedy, or a draw from the temperature-scaled nucleus."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        ordered, order = probs.sort(-1, descending=True)
        outside = ordered.cumsum(-1) - ordered >= sampling.top_p  # keep up to the token that reaches top_p
        ordered = ordered.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, sampling: Sampling, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """``(new tokens (B, N), their logits (B, N, vocab))`` for ``N = max_new_tokens``."""
    ids, mask = left_padded(input_ids, attention_mask, pad_id)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=ids.device).manual_seed(sampling.seed)
    tokens, scores = [], []
    last = torch.full((ids.shape[0], 1), 0, dtype=torch.long, device=ids.device)
    for _ in range(sampling.max_new_tokens):
        last.fill_(ids.shape[1] - 1)
        logits = model(ids, attention_mask=mask, positions=last, narrow=True)[:, -1]
        token = next_token(logits, sampling, generator)
        tokens.append(token)
        scores.append(logits.float())
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1), torch.stack(scores, 1)


@torch.no_grad()
def generate(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, sampling: Sampling, pad_id: int = 0
) -> tuple[Tensor, Tensor]:
    """New tokens and their (raw) logits: a Hugging Face model's own ``generate``, else ``sample``."""
    hf = hugging_face_model(model)
    if hf is None:
        return sample(model, input_ids, attention_mask, sampling, pad_id)
    ids, mask = left_padded(input_ids, attention_mask, pad_id)
    with torch.random.fork_rng(devices=[ids.device] if ids.is_cuda else []):
        torch.manual_seed(sampling.seed)
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p if sampling.temperature > 0 else None,
            top_k=0 if sampling.temperature > 0 else None,
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, ids.shape[1] :]
    return tokens, torch.stack(out.logits, 1).float()
