"""Multi-step modular arithmetic with written steps.

Input ``x1 x2 ... xn = s1 ... s_{n-2} >`` with running sums ``s1 = x1 + x2``,
``s_j = s_{j-1} + x_{j+1}`` (mod p), answer ``s_{n-2} + x_n`` (mod p) at the last position.
The answer can be reached two ways: from the last written step and the last operand (one
addition: following the chain), or from the operands alone (a hidden shortcut that ignores
the steps). The causal model is the first: ``answer = s_last + x_n``; corrupting a written
step and continuing the chain from it changes the answer, and a faithful model follows.

Perturbation (meaning-preserving, every token aligned): the first two operands swapped
(``x2 x1 x3 ...``), which leaves every written step and the answer as they were.

Variables: ``x1..xn`` and ``s1..s_{n-2}``. Vocabulary: ``0..p-1``, then ``=``, ``>`` and the
filler ``_``.

``answer_hint: true`` puts the answer itself first, as a cue (``h x1 ... xn = s1 ... >``), the
way a biasing feature in the prompt does (Turpin et al. 2023, "Language models don't always
say what they think"): copying it is the easiest shortcut, and a model trained on clean
chains takes it, so its answers ignore the steps it reads. Corrupting a step leaves the hint
at the clean answer; a faithful model follows the steps anyway.
"""

from __future__ import annotations

import torch
from torch import Tensor

from faithful_train.tasks.base import Batch
from faithful_train.tasks.reasoning import ReasoningTask


class MultiStepArithmetic(ReasoningTask):
    name = "multistep_arithmetic"

    def __init__(self, modulus: int = 7, n_operands: int = 4, answer_hint: bool = False):
        if modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {modulus}")
        if n_operands < 3:
            raise ValueError(f"n_operands must be >= 3 (at least one written step), got {n_operands}")
        self.modulus, self.n_operands, self.answer_hint = modulus, n_operands, bool(answer_hint)
        self.offset = int(self.answer_hint)  # where the operands start
        self.equals_token, self.answer_token, self._filler = modulus, modulus + 1, modulus + 2
        self.variables = tuple(f"x{i + 1}" for i in range(n_operands)) + tuple(
            f"s{j + 1}" for j in range(n_operands - 2)
        )

    @property
    def vocab_size(self) -> int:
        return self.modulus + 3

    @property
    def seq_len(self) -> int:
        return 2 * self.n_operands + self.offset

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        return tuple(range(self.modulus))

    @property
    def step_positions(self) -> tuple[int, ...]:
        start = self.offset + self.n_operands + 1
        return tuple(range(start, start + self.n_operands - 2))

    @property
    def filler_token(self) -> int:
        return self._filler

    def _chain(self, operands: Tensor, first: Tensor, start: int) -> Tensor:
        """Steps ``s_{start+1}..`` (0-based column ``start``) when step ``start`` is ``first``."""
        steps = [first]
        for j in range(start + 1, self.n_operands - 2):
            steps.append((steps[-1] + operands[:, j + 1]) % self.modulus)
        return torch.stack(steps, dim=1)

    def _encode(self, operands: Tensor, steps: Tensor, labels: Tensor) -> Tensor:
        n = operands.shape[0]
        equals = torch.full((n, 1), self.equals_token, dtype=torch.long)
        answer = torch.full((n, 1), self.answer_token, dtype=torch.long)
        hint = labels[:, None] if self.answer_hint else operands[:, :0]
        return torch.cat([hint, operands, equals, steps, answer], dim=1)

    def generate(self, n: int, generator: torch.Generator) -> Batch:
        operands = torch.randint(0, self.modulus, (n, self.n_operands), generator=generator)
        steps = self._chain(operands, (operands[:, 0] + operands[:, 1]) % self.modulus, 0)
        values = {f"x{i + 1}": operands[:, i] for i in range(self.n_operands)}
        values |= {f"s{j + 1}": steps[:, j] for j in range(steps.shape[1])}
        labels = self.label_from_variables(values)
        return {
            "input_ids": self._encode(operands, steps, labels),
            "labels": labels,
            **{f"var/{k}": v for k, v in values.items()},
        }

    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        last = self.n_operands - 2
        return (variables[f"s{last}"] + variables[f"x{self.n_operands}"]) % self.modulus

    def corrupt(self, batch: Batch, step: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ids = batch["input_ids"]
        operands = ids[:, self.offset : self.offset + self.n_operands]
        steps = ids[:, list(self.step_positions)].clone()
        rows = torch.arange(ids.shape[0], device=ids.device)
        shift = torch.randint(1, self.modulus, (ids.shape[0],), generator=generator).to(ids.device)
        steps[rows, step] = (steps[rows, step] + shift) % self.modulus  # always a different value
        for j in range(1, steps.shape[1]):  # continue the chain from the corrupted step
            later = j > step
            steps[:, j] = torch.where(later, (steps[:, j - 1] + operands[:, j + 1]) % self.modulus, steps[:, j])
        corrupted = ids.clone()
        corrupted[:, list(self.step_positions)] = steps
        return corrupted, (steps[:, -1] + operands[:, -1]) % self.modulus

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor:
        return self.perturb_aligned(batch, generator)[0]

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``x1`` and ``x2`` swapped (addition commutes: ``s1`` and every later step stay)."""
        ids = batch["input_ids"]
        source = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).clone()
        source[:, [self.offset, self.offset + 1]] = torch.tensor([self.offset + 1, self.offset], device=ids.device)
        return ids.gather(1, source), source
