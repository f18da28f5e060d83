"""Sites: named places in a model where an activation can be read or overwritten.

A model that supports sites (our transformers, the Hugging Face adapter) implements
``site_points() -> dict[str, SitePoint]``: each canonical name (``blocks.1.resid_post``,
``blocks.0.attn.heads``, ``blocks.0.moe.router``...) maps to the module whose input or
output holds the activation, and to the two small functions that convert between that raw
hook value and the canonical tensor (``(batch, pos, ...)``).

A ``SiteRef`` narrows a site to token positions, attention heads and a slice of the last
dimension; it is plain data that can be written in a config and saved beside a checkpoint.

``hooked(model, record=..., edits=...)`` is the one context manager that reads and edits
sites: it records activations without detaching them (objectives need their gradients),
applies edits in the forward pass, and removes exactly the hooks it added.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.modeling.hooks import HookPoint, SitePoint, recording_suspended, records_suspended  # noqa: F401  (re-exported)
from faithful_train.tasks.batch import answer_position

Edit = Callable[[Tensor], Tensor]


TOKEN_CHOICES = ("all", "first", "last")
_ANSWER_OFFSET = re.compile(r"^(last|answer)\s*(?:([+-])\s*(\d+))?$")


@dataclass(frozen=True)
class PositionSpec:
    """Positions that differ from example to example, resolved on each batch (``resolve_positions``).

    ``span``: the tokens of the named span (``span/<name>`` in the batch), all of them or its
    ``first`` or ``last`` token. Without a span: the answer position (the prompt's last token,
    whose logits predict the first answer token) plus ``offset`` (``answer-1``: the token before).
    """

    span: str | None = None
    token: str = "all"
    offset: int = 0

    @classmethod
    def parse(cls, spec: Any) -> PositionSpec:
        if isinstance(spec, str):
            match = _ANSWER_OFFSET.match(spec.strip())
            if match is None:
                raise ConfigError(
                    f"positions {spec!r}: use a list of ints, 'last', 'answer', 'answer-<k>' or "
                    f"{{span: <name>, token: first|last|all}}"
                )
            offset = int(match[3] or 0) * (-1 if match[2] == "-" else 1)
            return cls(offset=offset)
        allowed = {"span", "token"}
        unknown = set(spec) - allowed
        if unknown:
            raise UnknownNameError("positions key", sorted(unknown)[0], allowed)
        if "span" not in spec:
            raise ConfigError(f"positions {dict(spec)!r} needs a 'span'")
        token = str(spec.get("token", "all"))
        if token not in TOKEN_CHOICES:
            raise UnknownNameError("span token choice", token, TOKEN_CHOICES)
        return cls(span=str(spec["span"]), token=token)

    def to_spec(self) -> Any:
        if self.span is not None:
            return {"span": self.span, "token": self.token}
        return "answer" if not self.offset else f"answer{self.offset:+d}"


@dataclass(frozen=True)
class SiteRef:
    """A site narrowed to positions (dim 1), heads (dim 2 of head sites) and dims (last dim).

    ``None`` means "all". ``dims`` is a half-open ``(start, stop)`` slice of the last dimension.
    ``positions`` are ints (counted from an example's first real token; negative ones from the
    end of its prompt) or a ``PositionSpec`` (a named span, or the answer position and an
    offset), resolved per example by ``resolve_positions``.
    """

    name: str
    positions: tuple[int, ...] | PositionSpec | None = None
    heads: tuple[int, ...] | None = None
    dims: tuple[int, int] | None = None

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | SiteRef) -> SiteRef:
        """Build from a site name, or a mapping ``{site, positions, heads, dims}``."""
        if isinstance(spec, SiteRef):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"a site must be a name or a mapping with 'site', got {spec!r}")
        allowed = {"site", "positions", "heads", "dims"}
        unknown = set(spec) - allowed
        if unknown:
            raise UnknownNameError("site key", sorted(unknown)[0], allowed)
        if "site" not in spec:
            raise ConfigError(f"site mapping {dict(spec)!r} needs a 'site' key")
        dims = spec.get("dims")
        if dims is not None:
            dims = tuple(int(d) for d in dims)
            if len(dims) != 2 or not 0 <= dims[0] < dims[1]:
                raise ConfigError(f"dims must be [start, stop) with 0 <= start < stop, got {list(dims)}")

        def ints(key: str) -> tuple[int, ...] | None:
            value = spec.get(key)
            if value is None:
                return None
            try:
                return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"site {spec['site']!r}: {key} must be ints, got {value!r}") from None

        positions = spec.get("positions")
        if isinstance(positions, (str, Mapping)):
            positions = PositionSpec.parse(positions)
        else:
            positions = ints("positions")
        return cls(str(spec["site"]), positions, ints("heads"), dims)

    @property
    def per_example(self) -> bool:
        """Whether the positions are resolved per example (a span or the answer position)."""
        return isinstance(self.positions, PositionSpec)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.name}
        for key in ("positions", "heads", "dims"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_spec() if isinstance(value, PositionSpec) else list(value)
        return out

    def mask(self, shape: Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Boolean mask of shape ``(1, *shape[1:])``: True where this ref selects."""
        mask = torch.ones((1, *shape[1:]), dtype=torch.bool, device=device)
        if self.name.endswith("attn.pattern") and (self.positions is not None or self.heads is not None):
            raise ConfigError(
                f"site {self.name} is (batch, head, query, key): narrow it with dims (keys), not positions or heads"
            )
        if self.per_example:
            raise ValueError(f"site {self.name}: per-example positions need resolve_positions")
        if self.positions is not None:
            keep = torch.zeros(shape[1], dtype=torch.bool, device=device)
            keep[list(self.positions)] = True
            mask &= keep.view(1, -1, *([1] * (len(shape) - 2)))
        if self.heads is not None:
            if len(shape) != 4:
                raise ConfigError(f"'heads' narrows only head sites (4-d), but {self.name} is {len(shape)}-d")
            keep = torch.zeros(shape[2], dtype=torch.bool, device=device)
            keep[list(self.heads)] = True
            mask &= keep.view(1, 1, -1, 1)
        if self.dims is not None:
            if self.dims[1] > shape[-1]:
                raise ConfigError(f"dims {list(self.dims)} exceed the width {shape[-1]} of site {self.name}")
            keep = torch.zeros(shape[-1], dtype=torch.bool, device=device)
            keep[self.dims[0] : self.dims[1]] = True
            mask &= keep.view(*([1] * (len(shape) - 1)), -1)
        return mask

    def select(self, value: Tensor) -> Tensor:
        """The narrowed part of an activation, flattened to ``(batch, features)``."""
        if self.per_example:
            raise ValueError(f"site {self.name}: per-example positions need resolve_positions")
        if self.positions is not None:
            value = value[:, list(self.positions)]
        if self.heads is not None:
            value = value[:, :, list(self.heads)]
        if self.dims is not None:
            value = value[..., self.dims[0] : self.dims[1]]
        return value.reshape(value.shape[0], -1)


def resolve_positions(ref: SiteRef, batch: Mapping[str, Tensor]) -> Tensor | None:
    """``(B, P)`` the positions ``ref`` names in each row of ``batch``, or ``None`` (every position).

    Ints count from each row's first real token (so padding does not move them); negative ints
    count back from the end of the prompt (``-1``: its last token, the answer position). A span
    with ``token: all`` needs the same number of tokens in every row.
    """
    spec = ref.positions
    if spec is None:
        return None
    ids = batch["input_ids"]
    B, T = ids.shape
    if isinstance(spec, PositionSpec):
        if spec.span is None:
            return (answer_position(batch) + spec.offset)[:, None]
        key = f"span/{spec.span}"
        if key not in batch:
            raise ConfigError(f"site {ref.name}: the batch has no span {spec.span!r} (a 'spans.{spec.span}' column)")
        start, stop = batch[key].unbind(1)
        if spec.token == "first":
            return start[:, None]
        if spec.token == "last":
            return (stop - 1)[:, None]
        lengths = stop - start
        if (lengths != lengths[0]).any():
            raise ConfigError(
                f"span {spec.span!r} has different token lengths across examples; use token: first or last"
            )
        return start[:, None] + torch.arange(int(lengths[0]), device=ids.device)[None]
    offsets = torch.tensor(spec, dtype=torch.long, device=ids.device)[None]
    mask = batch.get("attention_mask")
    first = (
        torch.zeros(B, 1, dtype=torch.long, device=ids.device) if mask is None else mask.long().argmax(1, keepdim=True)
    )
    end = answer_position(batch)[:, None] + 1 if "answer_pos" in batch else torch.full((B, 1), T, device=ids.device)
    return torch.where(offsets >= 0, first + offsets, end + offsets)


def attach_featurizer(model: nn.Module, site: str, featurizer: Any, suffix: str = "sae") -> str:
    """Make ``<site>.<suffix>`` a site: ``featurizer.encode`` of the site's values (an SAE's
    latents, ``(B, T, F)``). Writing features back puts ``decode(features)`` plus the
    reconstruction error of the clean values at the site, so an edit changes only what the
    edited features encode (an unedited write gives the clean values back). Returns the name."""
    resolve_site(model, site)
    name = f"{site}.{suffix}"
    model.__dict__.setdefault("_featurized_sites", {})[name] = (site, featurizer)
    return name


def featurized_sites(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """``{name: (base site, featurizer)}`` of the sites ``attach_featurizer`` added."""
    return model.__dict__.get("_featurized_sites", {})


def _featurized_point(base: SitePoint, featurizer: Any) -> SitePoint:
    def encode(x: Tensor) -> Tensor:
        return featurizer.encode(x.float())

    def read(raw: Any) -> Tensor:
        return encode(base.read(raw))

    def write(raw: Any, features: Tensor) -> Any:
        x = base.read(raw)
        error = x.float() - featurizer.decode(encode(x))
        return base.write(raw, (featurizer.decode(features) + error).to(x.dtype))

    return SitePoint(base.module, base.kind, read, write)


def resolve_site(model: nn.Module, name: str) -> SitePoint:
    """The site point for ``name``, or an error that lists the valid site names."""
    featurized = featurized_sites(model)
    if name in featurized:
        site, featurizer = featurized[name]
        return _featurized_point(resolve_site(model, site), featurizer)
    points = model.site_points()
    if name not in points:
        raise UnknownNameError("site", name, [*points, *featurized])
    return points[name]


def validate_sites(model: nn.Module, names: Iterable[str]) -> None:
    for name in names:
        resolve_site(model, name)


@contextmanager
def hooked(
    model: nn.Module,
    record: Iterable[str | SiteRef] = (),
    edits: Mapping[str, Edit | Sequence[Edit]] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Record and/or edit sites during forward passes run inside the block.

    ``record``: site names (or refs; the whole site is recorded) whose activations are put in
    the yielded dict, *not* detached. ``edits``: site name -> function (or list of functions,
    applied in order) from the canonical activation to its replacement. A recorded site that
    is also edited is recorded after the edit (what flows downstream).

    Only the hooks added here are removed on exit, whatever else is registered on the model.
    """
    edits = dict(edits or {})
    names_to_record = {SiteRef.parse(r).name for r in record}
    cache: dict[str, Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        # edits first: a site recorded on the module another site edits (a featurized site's
        # base, ``blocks.0.resid_post`` under ``blocks.0.resid_post.sae``) records what flows on
        for name in sorted(set(edits)) + sorted(names_to_record - set(edits)):
            point = resolve_site(model, name)
            fns = edits.get(name, ())
            fns = [fns] if callable(fns) else list(fns)
            handles.append(_register(point, name, fns, name in names_to_record, cache))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def _register(point: SitePoint, name: str, fns: list[Edit], keep: bool, cache: dict[str, Tensor]):
    def apply(raw: Any) -> Any:
        value = point.read(raw)
        for fn in fns:
            value = fn(value)
        if keep and not recording_suspended():  # a checkpoint's recomputation records nothing again
            cache[name] = value
        return point.write(raw, value) if fns else None

    if point.kind == "output":
        return point.module.register_forward_hook(lambda _m, _args, out: apply(out))
    if point.kind == "input":

        def pre_hook(_m: nn.Module, args: tuple) -> tuple | None:
            new = apply(args[0])
            return None if new is None else (new, *args[1:])

        return point.module.register_forward_pre_hook(pre_hook)
    raise ValueError(f"site point kind must be 'output' or 'input', got {point.kind!r}")


def run_with(
    model: nn.Module,
    input_ids: Tensor,
    record: Iterable[str | SiteRef] = (),
    edits: Mapping[str, Edit | Sequence[Edit]] | None = None,
    **forward_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward with recording and edits; returns ``(logits, cache)``."""
    with hooked(model, record, edits) as cache:
        logits = model(input_ids, **forward_kwargs)
    return logits, cache
