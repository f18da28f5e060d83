"""A transformer's computational graph as data: the nodes and edges circuits are made of.

Nodes (MIB's and EAP-IG's names, Hanna et al. 2024; Mueller et al. 2025): ``input`` (the
embeddings), ``a{L}.h{H}`` (one attention head's output, written into the residual stream),
``m{L}`` (block ``L``'s MLP or MoE block) and ``logits`` (the input of the final norm and
unembedding). Every node but ``logits`` is a *sender*; every node that reads the residual
stream is a *receiver*, heads three times over: a head's query, key and value inputs are apart
(``a2.h3<q>``, ``<k>``, ``<v>``). An edge ``s->r`` is a sender feeding a later receiver:

    input -> every head input and MLP;   a{L}.h{H} -> heads of later blocks, m{L}, later MLPs;
    m{L} -> heads and MLPs of later blocks;   every sender -> logits

Senders and receivers are indexed in EAP-IG's order (``Graph.forward_index`` /
``backward_index``), so a score matrix ``(n_senders, n_receivers)`` is laid out as theirs:
senders ``input, a0.h0 .. a0.h{H-1}, m0, a1.h0, ...``; receivers per block ``<q>`` of every head,
then ``<k>``, then ``<v>``, then the MLP; ``logits`` last. Entries that are not edges (a later
sender, a block's head into its own heads) are never in a circuit.

Grouped-query attention (llama, mixtral, ...): keys and values are computed per *query* head,
each from its group's key/value weights (TransformerLens's ``ungroup_grouped_query_attention``,
which EAP-IG requires), so ``s->a2.h1<k>`` changes the keys head 1 reads and no other head's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from faithful_train.errors import ConfigError
from faithful_train.io.files import atomic_write_text

_EDGE = re.compile(r"^\s*([^\s<>-]+)\s*->\s*([^\s<>-]+)\s*(?:<([a-z]+)>)?\s*$")
_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_MLP = re.compile(r"^m(\d+)$")
QKV = "qkv"


@dataclass(frozen=True)
class Graph:
    """The computational graph of a model with ``n_layers`` blocks of ``n_heads`` heads."""

    n_layers: int
    n_heads: int

    # -- nodes ------------------------------------------------------------------------------

    @cached_property
    def senders(self) -> list[str]:
        out = ["input"]
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}" for h in range(self.n_heads)] + [f"m{layer}"]
        return out

    @cached_property
    def receivers(self) -> list[str]:
        out = []
        for layer in range(self.n_layers):
            out += [f"a{layer}.h{h}<{x}>" for x in QKV for h in range(self.n_heads)] + [f"m{layer}"]
        return out + ["logits"]

    @property
    def n_senders(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_receivers(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def sender_index(self, name: str) -> int:
        """EAP-IG's ``forward_index``."""
        if name == "input":
            return 0
        layer, head = self._node(name, "sender")
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if head is None else head)

    def receiver_index(self, name: str, qkv: str | None = None) -> int:
        """EAP-IG's ``backward_index``: ``name`` a head with ``qkv``, an MLP, or ``logits``."""
        if name == "logits":
            if qkv is not None:
                raise ConfigError(f"edge into {name!r} with <{qkv}>: only attention heads have q/k/v inputs")
            return self.n_receivers - 1
        layer, head = self._node(name, "receiver")
        if head is None:
            if qkv is not None:
                raise ConfigError(f"edge into {name!r} with <{qkv}>: only attention heads have q/k/v inputs")
            return layer * (3 * self.n_heads + 1) + 3 * self.n_heads
        if qkv is None or qkv not in QKV:
            raise ConfigError(f"edge into head {name!r} needs <q>, <k> or <v>, got {qkv!r}")
        return layer * (3 * self.n_heads + 1) + QKV.index(qkv) * self.n_heads + head

    def _node(self, name: str, role: str) -> tuple[int, int | None]:
        head, mlp = _HEAD.match(name), _MLP.match(name)
        if head is not None:
            layer, h = int(head[1]), int(head[2])
            if layer < self.n_layers and h < self.n_heads:
                return layer, h
        elif mlp is not None and int(mlp[1]) < self.n_layers:
            return int(mlp[1]), None
        last = self.n_layers - 1
        valid = f"a0.h0 .. a{last}.h{self.n_heads - 1}, m0 .. m{last}"
        valid = f"input, {valid}" if role == "sender" else f"{valid}, logits"
        raise ConfigError(f"node {name!r} is not in the model's graph (a {role}: {valid})")

    def receiver_layer(self, index: int) -> int:
        """The block whose input receiver ``index`` is (``n_layers`` for logits)."""
        return min(index // (3 * self.n_heads + 1), self.n_layers)

    def sender_layer(self, index: int) -> int:
        """The block a sender writes from (``-1`` for the input)."""
        return -1 if index == 0 else (index - 1) // (self.n_heads + 1)

    # -- edges ------------------------------------------------------------------------------

    @cached_property
    def real(self) -> Tensor:
        """``(n_senders, n_receivers)`` bool: which entries are edges."""
        H = self.n_heads
        mask = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for layer in range(self.n_layers):
            before_attn = 1 + layer * (H + 1)  # input and every earlier block's senders
            start = layer * (3 * H + 1)
            mask[:before_attn, start : start + 3 * H] = True
            mask[: before_attn + H, start + 3 * H] = True  # the MLP reads its own block's heads
        mask[:, -1] = True
        return mask

    @cached_property
    def edges(self) -> list[tuple[int, int]]:
        """Every edge as ``(sender, receiver)`` indices, sender-major (the score matrix's order)."""
        return [tuple(ix) for ix in self.real.nonzero().tolist()]

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def edge_name(self, sender: int, receiver: int) -> str:
        return f"{self.senders[sender]}->{self.receivers[receiver]}"

    def parse_edge(self, spec: str, where: str = "edge") -> tuple[int, int]:
        """``"a0.h1->a2.h3<q>"`` -> ``(sender, receiver)`` indices; one-line errors for a node the
        model lacks, a q/k/v suffix on a non-head, or a pair that is not an edge."""
        match = _EDGE.match(str(spec))
        if match is None:
            raise ConfigError(
                f"{where}: {spec!r} is not an edge 'sender->receiver' (e.g. 'a0.h1->a1.h0<q>', 'm0->logits')"
            )
        sender, receiver, qkv = match.groups()
        if sender == "logits":
            raise ConfigError(f"{where}: {spec!r}: logits sends nothing")
        try:
            s = self.sender_index(sender)
            r = self.receiver_index(receiver, qkv) if receiver != "input" else None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if r is None or not self.real[s, r]:
            raise ConfigError(
                f"{where}: {spec!r} is not an edge: {sender} does not feed {receiver} (it is not earlier)"
            )
        return s, r

    def mask(self, edges: Sequence[tuple[int, int]]) -> Tensor:
        """``(n_senders, n_receivers)`` bool with ``edges`` set."""
        out = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for s, r in edges:
            out[s, r] = True
        return out

    def parse_circuit(self, specs: Sequence[str], where: str) -> Tensor:
        """A circuit's edge mask from config edge names (one-line error for an empty circuit)."""
        if isinstance(specs, str) or not specs:
            raise ConfigError(f"{where}: an edge circuit needs a list of at least one edge ('a0.h1->m1', ...)")
        return self.mask([self.parse_edge(spec, f"{where}.{i}") for i, spec in enumerate(specs)])

    def names(self, mask: Tensor) -> list[str]:
        """The names of a mask's edges, in listing order."""
        return [self.edge_name(s, r) for s, r in mask.nonzero().tolist()]

    # -- circuits from scores (MIB) -----------------------------------------------------------

    @cached_property
    def sender_of_receiver(self) -> Tensor:
        """``(n_senders, n_receivers)`` bool: receiver ``r`` is an input of sender node ``s``
        (EAP-IG's ``forward_to_backward``)."""
        out = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        H = self.n_heads
        for layer in range(self.n_layers):
            start = layer * (3 * H + 1)
            for h in range(H):
                for x in range(3):
                    out[1 + layer * (H + 1) + h, start + x * H + h] = True
            out[1 + layer * (H + 1) + H, start + 3 * H] = True
        return out

    def prune(self, mask: Tensor) -> Tensor:
        """EAP-IG's ``Graph.prune``: repeatedly drop edges whose sender has no edge in (``input``
        always has) or whose receiver's node sends nothing on (``logits`` always does)."""
        mask = mask & self.real
        while True:
            sends = mask.any(1)
            fed = (mask.any(0).float() @ self.sender_of_receiver.float().T) > 0
            fed[0] = True
            alive = sends & fed
            reach = (alive.float() @ self.sender_of_receiver.float()) > 0
            reach[-1] = True
            pruned = mask & alive[:, None] & reach[None, :]
            if torch.equal(pruned, mask):
                return pruned
            mask = pruned

    def top(self, scores: Tensor, n: int, prune: bool = True) -> Tensor:
        """The circuit of the ``n`` edges with the largest ``|score|`` (MIB's ``apply_topn``), pruned."""
        flat = scores.abs().float().masked_fill(~self.real, float("-inf")).flatten()
        out = torch.zeros(flat.numel(), dtype=torch.bool)
        out[flat.argsort(descending=True, stable=True)[:n]] = True
        out = out.view_as(self.real) & self.real
        return self.prune(out) if prune else out

    # -- files ------------------------------------------------------------------------------

    def to_json(self, scores: Tensor, in_graph: Tensor, d_model: int, kind: str) -> dict:
        """The graph in EAP-IG's / MIB's JSON (``Graph.from_json`` reads it): every edge's score
        and ``in_graph``; a node is in the graph when an edge of the circuit touches it."""
        sends = in_graph.any(1)
        nodes = {name: {"in_graph": bool(sends[i])} for i, name in enumerate(self.senders)}
        nodes["input"]["in_graph"] = True
        nodes["logits"] = {"in_graph": True}
        edges = {
            self.edge_name(s, r): {"score": float(scores[s, r]), "in_graph": bool(in_graph[s, r])}
            for s, r in self.edges
        }
        cfg = {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "parallel_attn_mlp": False,
            "d_model": d_model,
            "scores": kind,
        }
        return {"cfg": cfg, "nodes": nodes, "edges": edges}

    def write_json(self, path: Path, scores: Tensor, in_graph: Tensor, d_model: int, kind: str) -> None:
        atomic_write_text(path, json.dumps(self.to_json(scores, in_graph, d_model, kind)) + "\n")
