"""The ``Task`` interface: a seeded data source with a known causal model.

A task generates token batches with the answer token at the last position, and, per
example, the values of its high-level variables. Its causal model gives the
counterfactual label: the label the example *would* have if some variables took the
values they have on another (source) example. Objectives and audits use that label to
test a model's internal mechanism causally.

Batches are plain dicts of tensors (Lightning moves them to the device):

    input_ids  (B, T) long      the prompt; the answer is predicted at the last position
    labels     (B,)   long      the answer token
    var/<name> (B,)   long      value of each causal variable
    concept/<name> (B,) or (B, T) long   value of each concept label, per sequence or per token
    irrelevant (B, T) bool      (optional) tokens the label does not depend on (noise, decoys):
                                where a "right for the right reasons" term wants no attribution

To write your own task, subclass ``Task`` in your own file and name it in a config as
``task: {name: path/to/file.py:MyTask, ...constructor args}`` (see docs/guide/bring-your-own.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from faithful_train.errors import ConfigError, UnknownNameError

Batch = dict[str, Tensor]


def batch_seed(seed: int, index: int) -> int:
    """The seed of training batch ``index`` of a run seeded ``seed`` (and of the step's objective
    randomness): a pure function of the index, so a resumed run draws what the whole run would."""
    return (seed % 2**31) * 2**32 + index


class Task(ABC):
    """A testbed with a known causal model. Subclasses set the class attributes below."""

    name: str = "task"
    variables: tuple[str, ...] = ()

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def seq_len(self) -> int: ...

    @abstractmethod
    def generate(self, n: int, generator: torch.Generator) -> Batch:
        """``n`` examples drawn with ``generator`` only (never the global RNG)."""

    @abstractmethod
    def label_from_variables(self, variables: dict[str, Tensor]) -> Tensor:
        """The causal model's output (answer token) given the values of its variables."""

    INFER_ANSWERS_FROM = 4096  # examples whose labels stand for the answer set when a task names none

    @property
    def answer_tokens(self) -> tuple[int, ...] | None:
        """The tokens an answer can be: audits predict among these, so a model that knows nothing
        scores chance (not below it, as an argmax over the whole vocabulary would). Default: the
        distinct labels of ``INFER_ANSWERS_FROM`` seeded examples; override it when some answer is
        rarer than that, or return ``None`` for any token."""
        inferred = self.__dict__.get("_inferred_answer_tokens")
        if inferred is None:
            labels = self.sample(self.INFER_ANSWERS_FROM, seed=0)["labels"]
            inferred = tuple(sorted(set(labels.reshape(-1).tolist())))
            self.__dict__["_inferred_answer_tokens"] = inferred
        return inferred

    @property
    def answer_length(self) -> int:
        """The most tokens an answer has (generated tasks: one)."""
        return 1

    @property
    def spans(self) -> tuple[str, ...]:
        """Named spans in batches (``span/<name>``), which alignments can name as positions."""
        return ()

    @property
    def concepts(self) -> dict[str, tuple[str, ...]]:
        """Concept labels in batches (``concept/<name>``): name -> the names of its values."""
        return {}

    def check_concept(self, name: str | None, owner: str) -> str:
        """``name`` (default: the task's only concept) if the task labels it, else an error."""
        if name is None and len(self.concepts) == 1:
            return next(iter(self.concepts))
        if name not in self.concepts:
            raise UnknownNameError(
                f"concept of task {self.name!r} for {owner}{self.column_hint('concepts')}", str(name), self.concepts
            )
        return name

    marks_irrelevant: bool = False  # whether batches carry ``irrelevant`` (tokens the label ignores)

    @property
    def provides(self) -> frozenset[str]:
        """What the task gives beyond ``input_ids``, ``labels`` and its variables, declared so that
        objectives and audits check it at bind time without sampling: ``perturbations``
        (position-aligned, ``perturb``), ``aligned_perturbations`` (``perturb_aligned``),
        ``irrelevant``, ``concepts``, ``documents`` (``span/doc<j>``), ``tool_calls`` (``span/tool``,
        ``span/result``, ``tool_ids``), ``counterfactual_evidence``. Default: from the methods the task overrides,
        ``marks_irrelevant`` and ``concepts``; a task whose data decides it overrides this."""
        kinds = set()
        if type(self).perturb is not Task.perturb:
            kinds |= {"perturbations", "aligned_perturbations"}
        if type(self).perturb_aligned is not Task.perturb_aligned:
            kinds.add("aligned_perturbations")
        if type(self).counterfactual_evidence is not Task.counterfactual_evidence:
            kinds.add("counterfactual_evidence")
        if self.marks_irrelevant:
            kinds.add("irrelevant")
        if self.concepts:
            kinds.add("concepts")
        return frozenset(kinds)

    @property
    def filler_token(self) -> int | None:
        """A token without content, put in place of evidence an audit takes out (a document, a
        tool's result, a written step); ``None`` if the task has none."""
        return None

    @property
    def tool_tokens(self) -> tuple[int, ...]:
        """The tokens that call a tool (tasks that provide ``tool_calls``); default: none."""
        return ()

    def counterfactual_evidence(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(input_ids, answers (B,))``: each row with the evidence its answer rests on (the
        supporting document's fact, the tool's result) changed, the schema and length kept, and
        the answer that evidence then gives. A task that overrides this provides
        ``counterfactual_evidence`` (``provides``); objectives and audits check that first."""
        raise ConfigError(
            f"task {self.name!r} has no counterfactual evidence: it does not override Task.counterfactual_evidence"
        )

    def perturb(self, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """Meaning-preserving perturbations: ``input_ids`` of the same shape whose labels and
        concepts are those of ``batch``; ``None`` if the task has none."""
        return None

    def perturb_aligned(self, batch: Batch, generator: torch.Generator) -> tuple[Tensor, Tensor] | None:
        """Meaning-preserving perturbations with a token alignment: ``(input_ids', source)``, where
        ``source[b, j]`` is the position in ``batch["input_ids"][b]`` that token ``j`` of the
        perturbed sequence stands for, or -1 if it stands for none (inserted filler, resampled
        noise). Default: ``perturb`` with every position aligned to itself; ``None`` if the task
        has no perturbations."""
        ids = self.perturb(batch, generator)
        if ids is None:
            return None
        return ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids).clone()

    def validation_metrics(self, answer_logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """The task's own figures on a validation batch, from the logits at its answer positions
        ``(B, A, vocab)``, logged as ``val/<name>``. Default: for rows with a foil (a wrong answer
        the task names, ``foil_ids``: IOI's subject), ``logit_diff``, the answer's logit less the
        foil's at the first answer token (Wang et al. 2022)."""
        if "foil_ids" not in batch:
            return {}
        first = answer_logits[:, 0]
        diff = first.gather(1, batch["labels"][:, None]) - first.gather(1, batch["foil_ids"][:, None])
        return {"logit_diff": diff.float().mean()}

    def token_name(self, token: int) -> str:
        """A readable name of a token (per-token reports)."""
        return str(token)

    def check_variables(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.variables:
                raise UnknownNameError(f"variable of task {self.name!r}", name, self.variables)

    def counterfactual_labels(self, base: Batch, source: Batch, variables: Sequence[str]) -> Tensor:
        """Label of each base example after setting ``variables`` to the source's values."""
        self.check_variables(variables)
        values = {v: (source if v in variables else base)[f"var/{v}"] for v in self.variables}
        return self.label_from_variables(values)

    def counterfactual_answers(self, base: Batch, source: Batch, variables: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(answer ids (B, A), mask (B, A))`` of each base example after setting ``variables``
        to the source's values; one token (``counterfactual_labels``) unless a task overrides it."""
        labels = self.counterfactual_labels(base, source, variables)[:, None]
        return labels, torch.ones_like(labels, dtype=torch.bool)

    def explicit_pairs(self, batch: Batch, variables: Sequence[str]) -> Pairs | None:
        """The counterfactual pairs a batch carries for ``variables`` (a file's ``source.<v>`` and
        ``counterfactual_answer.<v>`` columns), or ``None`` (generated tasks: none)."""
        return None

    def pairs_from(self, base: Batch, source: Batch, variables: Sequence[str]) -> Pairs:
        """Pairs with one source set for every variable, answers from the causal model."""
        answers = {v: self.counterfactual_answers(base, source, [v]) for v in variables}
        return Pairs({v: source for v in variables}, answers)

    def interchange_pairs(self, batch: Batch, variables: Sequence[str], generator: torch.Generator) -> Pairs:
        """The source of each base example for an interchange on each variable, and the answer the
        causal model then predicts. Default: one in-batch permutation for every variable (its
        activations are the step's own, recorded in its forward). Tasks with explicit
        counterfactual pairs (a file's ``source.<v>`` columns) return those rows instead."""
        explicit = self.explicit_pairs(batch, variables)
        if explicit is not None:
            return explicit
        B = batch["input_ids"].shape[0]
        permutation = torch.randperm(B, generator=generator).to(batch["input_ids"].device)
        source = take(batch, permutation)
        answers = {v: self.counterfactual_answers(batch, source, [v]) for v in variables}
        return Pairs({v: source for v in variables}, answers, permutation)

    def sample(self, n: int, seed: int) -> Batch:
        """A fixed, seeded set (audit sets; validation too, unless ``validation_set`` differs)."""
        return self.generate(n, torch.Generator().manual_seed(seed))

    def validation_set(self, n: int, seed: int) -> Batch:
        """The fixed validation set."""
        return self.sample(n, seed)

    def train_batch(self, index: int, batch_size: int, seed: int) -> Batch:
        """Training batch ``index`` of the stream: a pure function of ``index`` (exact resume)."""
        return self.generate(batch_size, torch.Generator().manual_seed(batch_seed(seed, index)))

    def perplexity_batches(self, batch_size: int) -> list[Batch] | None:
        """Batches of held-out plain text for ``val/ppl`` (``None``: the task has none)."""
        return None

    def check_context(self, context: int) -> None:
        """Raise a ``FaithfulError`` if an input is longer than a model's ``context``."""
        if self.seq_len > context:
            raise ConfigError(
                f"task {self.name!r}: sequences of {self.seq_len} tokens exceed the model's context ({context})"
            )

    def check_sample_size(self, n: int, owner: str) -> None:  # noqa: B027  (an overridable hook: no check by default)
        """Raise a ``FaithfulError`` if ``n`` examples cannot be sampled (finite data)."""

    def column_hint(self, feature: str) -> str:
        """Where a task that reads files would find ``feature`` (``perturbations``, ``irrelevant``,
        ``concepts``, ``variables``), as an error's hint: ``" (needs ...)"``, or ``""``."""
        return ""


@dataclass
class Pairs:
    """Interchange pairs per variable: the source rows (row-aligned with the base batch), the
    counterfactual answer ``(ids (B, A), mask (B, A))``, and, when every source is the batch's
    own rows reordered, that ``permutation`` (the sources' activations are then the step's)."""

    sources: dict[str, Batch]
    answers: dict[str, tuple[Tensor, Tensor]]
    permutation: Tensor | None = None


def take(batch: Batch, index: Tensor | slice) -> Batch:
    """The rows ``index`` of every tensor in a batch."""
    return {key: value[index] for key, value in batch.items()}
