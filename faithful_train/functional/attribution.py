"""Batched feature attribution: integrated gradients and gradient × input, over any site.

Pure tensor functions (no Lightning), usable in audits and, with ``create_graph=True``, inside
training objectives (double backprop). The attributed function is ``fn: (N, *shape) -> (N,)``,
one scalar per row, e.g. the target logit; ``site_function`` builds it for a site of a model.

Row layout, shared by every function here: a batch of ``B`` examples evaluated at ``G``
points is stacked point-major, ``(G, B, *shape)`` flattened to ``(G * B, *shape)``, so row
``r`` belongs to example ``r % B`` (captum's layout too).

Integrated gradients evaluates all quadrature points in one call of ``fn`` and takes one
``torch.autograd.grad`` of the weighted sum of the outputs, then ``f(x)`` and ``f(baseline)``
in one gradient-free call; captum runs one ``autograd.grad`` over ``B * steps`` scalars (a
Python tuple of them) and two more forwards for the delta.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from faithful_train.errors import UnknownNameError
from faithful_train.intervene.engine import plan_resume, run_variants
from faithful_train.intervene.sites import resolve_site, run_with
from faithful_train.modeling.interface import resid_before

ScalarFn = Callable[[Tensor], Tensor]

QUADRATURES: tuple[str, ...] = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
OUTPUTS: tuple[str, ...] = ("logit", "logprob", "sum_logprob")
METHODS: tuple[str, ...] = ("integrated_gradients", "gradient_x_input")


@dataclass
class Attribution:
    """What an attribution method returns (all per example, batch first).

    ``values``: the attributions, shaped like the inputs (``attribute_tokens``: per-token
    sums ``(B, T)``, with the per-feature values in ``features``). ``delta``: the completeness
    gap ``sum(values) - (output - baseline_output)``; ``None`` where not defined.
    ``output``: ``f(x)``; ``baseline_output``: ``f(baseline)`` (gradient × input: ``f(0)``).
    """

    values: Tensor
    delta: Tensor | None
    output: Tensor
    baseline_output: Tensor
    features: Tensor | None = None


@functools.lru_cache(maxsize=64)
def _quadrature64(steps: int, method: str) -> tuple[Tensor, Tensor]:
    if method not in QUADRATURES:
        raise UnknownNameError("quadrature", method, QUADRATURES)
    if method == "gausslegendre":
        if steps < 1:
            raise ValueError(f"gausslegendre needs steps >= 1, got {steps}")
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy(0.5 * (1 + nodes)), torch.from_numpy(0.5 * weights)
    if steps < 2:
        raise ValueError(f"{method} needs steps >= 2, got {steps}")
    k = torch.arange(steps, dtype=torch.float64)
    weights = torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if method == "riemann_left":
        alphas = k / steps
    elif method == "riemann_right":
        alphas = (k + 1) / steps
    elif method == "riemann_middle":
        alphas = (k + 0.5) / steps
    else:  # riemann_trapezoid
        alphas = k / (steps - 1)
        weights[0] /= 2
        weights[-1] /= 2
    return alphas, weights


def quadrature(steps: int, method: str = "gausslegendre") -> tuple[Tensor, Tensor]:
    """Nodes ``alphas`` in [0, 1] and weights of a ``steps``-point rule for ``int_0^1 g``.

    The rules and names of captum's ``approximation_methods`` (``riemann_left/right/middle``:
    ``1/n`` weights at ``k/n``, ``(k+1)/n``, ``(k+1/2)/n``; ``riemann_trapezoid``: ``k/(n-1)``
    with halved end weights (captum's ``1/n`` spacing, so weights sum to ``1 - 1/n``);
    ``gausslegendre``: numpy's Gauss-Legendre rule mapped from [-1, 1]). Float64; captum rounds
    the Riemann nodes and all weights to float32, a difference below 1e-7.
    """
    alphas, weights = _quadrature64(int(steps), method)
    return alphas.clone(), weights.clone()


def integrated_gradients(
    fn: ScalarFn,
    inputs: Tensor,
    baseline: Tensor | float | None = None,
    steps: int = 32,
    method: str = "gausslegendre",
    create_graph: bool = False,
    internal_batch_size: int | None = None,
) -> Attribution:
    """Integrated gradients (Sundararajan et al. 2017, "Axiomatic attribution for deep networks"):

        IG_i(x) = (x_i - b_i) * int_0^1 df/dx_i (b + a (x - b)) da
                ~ (x_i - b_i) * sum_k w_k df/dx_i (b + a_k (x - b))

    with the quadrature ``method`` (captum's rules, see ``quadrature``). Completeness:
    ``sum_i IG_i = f(x) - f(b)`` up to the quadrature error, reported as ``delta``.

    ``fn``: ``(N, *shape) -> (N,)``, rows independent, row ``r`` of example ``r % B``.
    ``inputs``: ``(B, *shape)``; ``baseline``: broadcastable to it (default zeros).
    ``create_graph``: keep the graph, so that everything returned is differentiable w.r.t. the
    parameters and the inputs (a training objective; ``fn`` then runs with PyTorch's math
    attention kernel, the one with a double backward); otherwise all is detached.

    Calls of ``fn``: the ``steps`` points in one call of ``steps * B`` rows, differentiated by
    one ``autograd.grad`` of ``sum_k w_k f(point_k)``. ``f(x)`` and ``f(b)`` (unless the rule
    has a node at exactly 1 or 0, which is then used) in a second, gradient-free call of
    ``2 B`` rows: on CPU that is faster than adding them to the differentiated call, where
    their backward costs more than a forward (dense-tiny, B = 128, 32 steps: 127 against
    135 ms). With ``create_graph`` they join the differentiated call (they need the graph).
    ``internal_batch_size`` caps the rows per call (rounded down to whole groups of ``B``, at
    least one group).
    """
    alphas64, weights64 = _quadrature64(int(steps), method)
    dtype, device = inputs.dtype, inputs.device
    batch = inputs.shape[0]
    baseline = torch.zeros((), dtype=dtype, device=device) if baseline is None else baseline
    baseline = torch.as_tensor(baseline, dtype=dtype, device=device).expand_as(inputs)
    nodes, weights = alphas64.tolist(), weights64.tolist()
    ends = [end for end in (1.0, 0.0) if end not in nodes]  # f(x), f(b) the rule does not give
    if create_graph:  # differentiated with the points, at weight 0
        nodes, weights, ends = nodes + ends, weights + [0.0] * len(ends), []
    alpha = torch.tensor(nodes, dtype=dtype, device=device).view((len(nodes),) + (1,) * inputs.dim())
    weight = torch.tensor(weights, dtype=dtype, device=device)
    per_call = len(nodes) if internal_batch_size is None else max(1, int(internal_batch_size) // batch)

    with torch.enable_grad():
        if create_graph:
            x, b = inputs, baseline
            points = torch.lerp(b.unsqueeze(0), x.unsqueeze(0), alpha)  # exact at a = 0 and 1
            if not points.requires_grad:
                points.requires_grad_()
        else:
            x, b = inputs.detach(), baseline.detach()
            with torch.no_grad():
                points = torch.lerp(b.unsqueeze(0), x.unsqueeze(0), alpha)
            points.requires_grad_()
        outputs, grads = [], []
        for start in range(0, len(nodes), per_call):
            chunk = points[start : start + per_call]
            with _double_backward_safe(create_graph):
                out = fn(chunk.flatten(0, 1)).view(chunk.shape[0], batch)
            # one backward of sum_k w_k f(point_k): the weighted gradient sum, no per-row grads
            (grad,) = torch.autograd.grad(
                out,
                chunk,
                grad_outputs=weight[start : start + per_call, None].expand_as(out),
                create_graph=create_graph,
            )
            outputs.append(out if create_graph else out.detach())
            grads.append(grad.sum(0))
        if ends:
            outputs += _no_grad_calls(fn, [x if end == 1.0 else b for end in ends], per_call)
        out = torch.cat(outputs)
        nodes += ends
        values = (grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)) * (x - b)
        output, baseline_output = out[nodes.index(1.0)], out[nodes.index(0.0)]
        delta = values.reshape(batch, -1).sum(1) - (output - baseline_output)
    return Attribution(values, delta, output, baseline_output)


def _no_grad_calls(fn: ScalarFn, groups: list[Tensor], per_call: int) -> list[Tensor]:
    """``fn`` on each group of ``B`` rows, ``per_call`` groups per call, without a graph;
    returns ``(groups in the call, B)`` outputs per call."""
    results = []
    with torch.no_grad():
        for start in range(0, len(groups), per_call):
            chunk = torch.stack(groups[start : start + per_call])
            results.append(fn(chunk.flatten(0, 1)).view(chunk.shape[0], chunk.shape[1]))
    return results


def gradient_x_input(fn: ScalarFn, inputs: Tensor, create_graph: bool = False) -> Attribution:
    """Gradient × input (Shrikumar et al. 2016; Ancona et al. 2018): ``x_i * df/dx_i (x)``,
    captum's ``InputXGradient``; integrated gradients with a zero baseline and one step.
    ``delta = sum(values) - (f(x) - f(0))`` measures how far ``f`` is from linear along ``x``:
    zero for affine ``f`` and for ``f`` homogeneous of degree 1 (bias-free ReLU networks).
    ``f(0)`` comes from a second, gradient-free call of ``B`` rows (with ``create_graph``, from
    the differentiated call, as in ``integrated_gradients``).
    """
    batch = inputs.shape[0]
    with torch.enable_grad():
        if create_graph:
            points = torch.stack([inputs, torch.zeros_like(inputs)])
            if not points.requires_grad:
                points.requires_grad_()
            with _double_backward_safe(True):
                out = fn(points.flatten(0, 1)).view(2, batch)
            weight = torch.tensor([1.0, 0.0], dtype=out.dtype, device=out.device)[:, None].expand_as(out)
            (grad,) = torch.autograd.grad(out, points, grad_outputs=weight, create_graph=True)
            x, grad, output, zero_output = inputs, grad[0], out[0], out[1]
        else:
            x = inputs.detach().requires_grad_()
            output = fn(x)
            (grad,) = torch.autograd.grad(output, x, grad_outputs=torch.ones_like(output))
            x, output = x.detach(), output.detach()
            zero_output = _no_grad_calls(fn, [torch.zeros_like(x)], 1)[0][0]
        values = grad * x
        delta = values.reshape(batch, -1).sum(1) - (output - zero_output)
    return Attribution(values, delta, output, zero_output)


def _double_backward_safe(create_graph: bool) -> contextlib.AbstractContextManager:
    """The fused attention kernels (flash, memory-efficient) have no double backward; the
    math kernel does. Only with ``create_graph``: otherwise the fused kernels stay on."""
    return sdpa_kernel([SDPBackend.MATH]) if create_graph else contextlib.nullcontext()


# --- sites of a model ---


def _clean_site(model: nn.Module, site: str, fast: bool) -> int | None:
    """The block whose input *is* ``site`` (``embed``, ``resid_pre``, ``resid_post`` below the
    last block) on a model that can resume, else ``None``: its activation is then the clean
    prefix, computed without running the blocks above."""
    plan = plan_resume(model, [site]) if fast else None
    return plan.layer if plan is not None and plan.aliases[site] == plan.site else None


def _activation(
    model: nn.Module, input_ids: Tensor, site: str, attention_mask: Tensor | None, layer: int | None
) -> Tensor:
    if layer is None:
        _, cache = run_with(model, input_ids, record=[site], attention_mask=attention_mask)
        return cache[site]
    return resid_before(model, layer, input_ids, attention_mask)


def _select(logits: Tensor, target: Tensor, output: str) -> Tensor:
    """``(N, V)`` answer-position logits -> ``(N,)``: the logit or log-probability of
    ``target[r % B]``, or (``sum_logprob``) the sum of every class's log-probability, Ross et
    al. 2017's choice for "right for the right reasons": unlike the target's log-probability, its
    gradient does not vanish once the model is confident."""
    if output == "sum_logprob":
        return logits.log_softmax(-1).sum(-1)
    if output == "logprob":
        logits = logits.log_softmax(-1)
    index = target.repeat(logits.shape[0] // target.shape[0])
    return logits.gather(1, index[:, None]).squeeze(1)


def site_function(
    model: nn.Module,
    input_ids: Tensor,
    site: str,
    target: Tensor | int,
    attention_mask: Tensor | None = None,
    output: str = "logit",
    fast: bool = True,
    positions: Tensor | None = None,
) -> tuple[Tensor, ScalarFn]:
    """The activation at ``site`` on ``input_ids`` (B, T), and ``fn(z) -> (N,)``: the model's
    ``output`` (raw ``logit``, or ``logprob``) of ``target[r % B]`` at the answer position
    (``positions`` (B,), default the last; padding in ``attention_mask``), with
    the site's activation replaced by row ``r`` of ``z`` (N a multiple of B, the layout of
    ``integrated_gradients``). The activation is not detached (objectives need its graph).

    ``fn`` runs through the engine (``run_variants``): on a model that can resume, nothing
    before the site's block is re-run and the last block computes the answer position only;
    Hugging Face models run in full on the repeated ``input_ids`` with the site edited.
    ``fast=False`` forces full forwards.
    """
    resolve_site(model, site)  # an UnknownNameError listing the valid sites
    if output not in OUTPUTS:
        raise UnknownNameError("attribution output", output, OUTPUTS)
    batch = input_ids.shape[0]
    target = torch.as_tensor(target, dtype=torch.long, device=input_ids.device).expand(batch)
    layer = _clean_site(model, site, fast)
    activation = _activation(model, input_ids, site, attention_mask, layer)
    if positions is None:
        positions = torch.full((batch,), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    rows = {"input_ids": input_ids, **({} if attention_mask is None else {"attention_mask": attention_mask})}

    def fn(z: Tensor) -> Tensor:
        def replaced(_value: Tensor, variants: range) -> Tensor:
            return z[variants.start * batch : variants.stop * batch]

        logits = run_variants(
            model, rows, z.shape[0] // batch, {site: replaced}, positions[:, None], {site: activation}, resume=fast
        )
        return _select(logits[:, 0], target, output)

    return activation, fn


def input_gradients(
    model: nn.Module,
    input_ids: Tensor,
    target: Tensor | int,
    site: str = "embed",
    output: str = "logit",
    attention_mask: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """``∂ output / ∂ activation`` at ``site`` ``(B, T, ...)``, with the graph kept (a training
    penalty on it back-propagates into the weights; Ross et al. 2017's input gradients)."""
    activation, fn = site_function(model, input_ids, site, target, attention_mask, output, positions=positions)
    z = activation if activation.requires_grad else activation.detach().requires_grad_()
    with _double_backward_safe(True):
        out = fn(z)
    return torch.autograd.grad(out.sum(), z, create_graph=True)[0]


def attribute_tokens(
    model: nn.Module,
    input_ids: Tensor,
    target: Tensor | int,
    method: str = "integrated_gradients",
    site: str = "embed",
    baseline: str | int | Tensor = "zeros",
    steps: int = 32,
    quadrature: str = "gausslegendre",
    create_graph: bool = False,
    attention_mask: Tensor | None = None,
    output: str = "logit",
    internal_batch_size: int | None = None,
    positions: Tensor | None = None,
) -> Attribution:
    """Per-token attribution of the answer-position ``output`` of ``target`` to the activation at
    ``site`` (default: the embeddings); ``positions`` (B,): the answer position (default: last).

    ``values`` (B, T) is the attribution summed over each position's features (all dims after
    the position: completeness then holds per example over the tokens); ``features`` keeps the
    per-feature values. ``baseline``: ``"zeros"`` (zero activation), a tensor broadcastable to
    the activation, or a token id: the site's activation on ``input_ids`` with every token
    replaced by it (e.g. a pad token; captum's ``LayerIntegratedGradients`` with token
    baselines). ``method``: ``integrated_gradients`` (``steps``, ``quadrature``) or
    ``gradient_x_input`` (which ignores the baseline).
    """
    if method not in METHODS:
        raise UnknownNameError("attribution method", method, METHODS)
    activation, fn = site_function(model, input_ids, site, target, attention_mask, output, positions=positions)
    if method == "gradient_x_input":
        result = gradient_x_input(fn, activation, create_graph)
    else:
        if isinstance(baseline, str):
            if baseline != "zeros":
                raise UnknownNameError("attribution baseline", baseline, ("zeros", "<token id>", "<tensor>"))
            base = None
        elif isinstance(baseline, int):
            layer = _clean_site(model, site, True)
            base = _activation(model, torch.full_like(input_ids, baseline), site, attention_mask, layer)
        else:
            base = baseline
        result = integrated_gradients(fn, activation, base, steps, quadrature, create_graph, internal_batch_size)
    features = result.values
    result.values = features.reshape(*features.shape[:2], -1).sum(-1)
    result.features = features
    return result


def aligned_attributions(attr: Tensor, attr_perturbed: Tensor, source: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The original attribution of the token each perturbed token stands for, the perturbed
    attribution, both ``(B, T')`` in the perturbed order, and the mask ``source >= 0``."""
    aligned = source >= 0
    original = attr.gather(1, source.clamp_min(0))
    return original * aligned, attr_perturbed * aligned, aligned


def aligned_cosine(attr: Tensor, attr_perturbed: Tensor, source: Tensor, eps: float = 1e-8) -> Tensor:
    """Per example, cos between the attributions of the aligned tokens: ``attr (B, T)`` of the
    original, ``attr_perturbed (B, T')`` of the perturbation, ``source (B, T')`` its alignment
    (-1: none). Rows with no aligned token (or an all-zero side) get 1 (nothing to disagree on)."""
    original, perturbed, _ = aligned_attributions(attr, attr_perturbed, source)
    dot = (original * perturbed).sum(1)
    norms = original.norm(dim=1) * perturbed.norm(dim=1)
    return torch.where(norms > eps, dot / (norms + eps), torch.ones_like(dot))
