"""Edge-level circuits: the graph, exact edge patching against a one-forward-per-edge hooked
reference (``tests/unit/edge_reference.py``), EAP / EAP-IG against the reference's derivatives,
and MIB's measures over edges."""

import math

import pytest
import torch

from faithful_train.errors import ConfigError
from faithful_train.functional.circuits import answer_metric
from faithful_train.functional.edges import (
    MIB_FRACTIONS,
    circuit_logits,
    corrupt_record,
    curve_circuits,
    edge_scores,
    knockouts,
    mib_measures,
    record,
)
from faithful_train.intervene.edges import graph_forward, model_graph
from faithful_train.intervene.graph import Graph
from faithful_train.modeling.hf import HFAdapter
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from tests.unit import edge_reference as reference
from tests.unit.hf_configs import CONFIGS, VOCAB

D = 32


def make(name):
    if name == "ours":
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(vocab_size=VOCAB, d_model=D, n_heads=4, n_layers=2, d_mlp=64))
        for p in model.parameters():  # weights large enough that every edge matters
            p.data.normal_(0, 0.3)
    elif name == "llama-mha":
        model = HFAdapter.from_config("llama", dict(CONFIGS["llama"], num_key_value_heads=4), vocab_size=VOCAB, seed=0)
    else:
        model = HFAdapter.from_config(name, CONFIGS[name], vocab_size=VOCAB, seed=0)
    if name != "ours":
        for p in model.parameters():
            if p.dim() > 1:
                p.data.normal_(0, 0.2)
    return model.eval()


def batches(padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 7), generator=g)
    bad = ids.clone()
    bad[:, 3] = torch.randint(1, VOCAB, (4,), generator=g)
    bad[:, 5] = torch.randint(1, VOCAB, (4,), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
        mask[2, :1] = 0
    answer = torch.full((4, 1), 6)
    clean = {"input_ids": ids, "attention_mask": mask, "answer_pos": answer, "labels": ids[:, 0]}
    return clean, {"input_ids": bad, "attention_mask": mask, "answer_pos": answer}


def logit_diff(labels):
    return lambda logits: answer_metric("logit_diff", logits, labels)


FAMILIES = ["ours", "gpt2", "llama", "mixtral", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_edge_level_forward_is_the_model(name):
    model = make(name)
    clean, _ = batches()
    read = torch.full((4, 2), 6)
    read[:, 0] = 4
    with torch.no_grad():
        expected = model(clean["input_ids"], attention_mask=clean["attention_mask"], positions=read)
        ours, _ = graph_forward(model, clean["input_ids"], clean["attention_mask"], read)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ours", "gpt2", "llama-mha", "llama"])
def test_single_edge_knockouts_equal_one_hooked_forward_per_edge(name):
    model = make(name)
    clean, bad = batches()
    graph = model_graph(model)
    edges = graph.edges
    if name == "llama":  # grouped keys/values: a head's own k/v is not a module output; q, MLPs and logits are
        edges = [(s, r) for s, r in edges if not graph.receivers[r].endswith(("<k>", "<v>"))]
    with torch.no_grad():
        _, clean_senders = record(model, clean)
        _, bad_senders = record(model, bad)
        corrupt = bad_senders.wide(model.graph_parts())
        ours = circuit_logits(model, clean, knockouts(graph, edges), corrupt, memory_budget=1 << 20)
    names = [(graph.senders[s], graph.receivers[r]) for s, r in edges]
    expected = reference.knockout_logits(model, clean, bad, names)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    full = model(clean["input_ids"], attention_mask=clean["attention_mask"], positions=clean["answer_pos"])[:, 0]
    assert (expected - full).abs().amax(-1).median() > 1e-3  # knockouts change the answer


def test_grouped_keys_are_per_query_head():
    """Under GQA an edge into one head's <k> moves that head alone: its group sibling reads clean keys."""
    model = make("llama")
    clean, bad = batches()
    graph = model_graph(model)
    with torch.no_grad():
        corrupt = record(model, bad)[1].wide(model.graph_parts())
        edges = [graph.parse_edge("input->a1.h0<k>"), graph.parse_edge("input->a1.h1<k>")]
        both = knockouts(graph, edges[:1], base=knockouts(graph, edges[1:])[0])
        logits = circuit_logits(model, clean, torch.cat([knockouts(graph, edges), both]), corrupt)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[2], logits[0], atol=1e-4)


@pytest.mark.parametrize("name", ["ours", "gpt2", "llama-mha"])
def test_eap_and_eap_ig_inputs_equal_the_hooked_derivatives(name):
    """EAP: the derivative along each edge's difference at the clean run; EAP-IG (inputs): its mean
    over the runs on interpolated input embeddings, each by the reference (one backward per edge)."""
    model = make(name)
    clean, bad = batches()
    metric = logit_diff(clean["labels"])
    graph = model_graph(model)
    edges = graph.edges[:: max(1, graph.n_edges // 60)]
    names = [(graph.senders[s], graph.receivers[r]) for s, r in edges]
    eap = edge_scores(model, clean, metric, "eap", corrupted=bad)
    expected = reference.attribution(model, clean, bad, names, metric)
    got = torch.stack([eap[s, r] for s, r in edges]).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    steps = 3
    ig = edge_scores(model, clean, metric, "eap-ig-inputs", steps=steps, corrupted=bad, memory_budget=1 << 18)
    embed = model.site_points()["embed"].module
    with torch.no_grad():
        e_clean = _embedding(model, embed, clean)
        e_bad = _embedding(model, embed, bad)
    total = sum(
        reference.attribution(model, clean, bad, names, metric, e_bad + k / steps * (e_clean - e_bad))
        for k in range(steps)
    )
    torch.testing.assert_close(torch.stack([ig[s, r] for s, r in edges]).float(), total / steps, atol=1e-4, rtol=1e-4)
    assert (ig - eap).abs().max() > 1e-3  # the interpolation matters on this model


def _embedding(model, module, batch):
    kept = {}
    handle = module.register_forward_hook(lambda _m, _a, out: kept.update(e=out))
    model(batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    return kept["e"]


def test_eap_ig_activations_interpolate_each_sender_group():
    """EAP-IG (activations): every group (input, each block's heads, each MLP) at alpha = k/steps
    between corrupted and clean, the others as they compute; checked against the same runs made
    with site hooks one variant at a time."""
    model = make("ours")
    clean, bad = batches(padded=False)
    metric = logit_diff(clean["labels"])
    steps = 2
    scores = edge_scores(model, clean, metric, "eap-ig-activations", steps=steps, corrupted=bad)
    graph = model_graph(model)
    sites = {"input": "embed", **{f"a{i}": f"blocks.{i}.attn.heads" for i in range(2)}}
    sites |= {f"m{i}": f"blocks.{i}.mlp.out" for i in range(2)}
    from faithful_train.intervene.sites import run_with

    with torch.no_grad():
        _, c = run_with(model, clean["input_ids"], record=sites.values())
        _, b = run_with(model, bad["input_ids"], record=sites.values())
    edges = graph.edges[::7]
    names = [(graph.senders[s], graph.receivers[r]) for s, r in edges]
    total = 0
    for site in sites.values():
        for k in range(1, steps + 1):
            value = (k / steps * c[site] + (1 - k / steps) * b[site]).detach()
            module = model.site_points()[site].module

            def during(module=module, value=value):
                return [module.register_forward_hook(lambda _m, _a, _o: value)]

            total = total + reference.attribution(model, clean, bad, names, metric, during=during)
    expected = total / (len(sites) * steps)
    torch.testing.assert_close(torch.stack([scores[s, r] for s, r in edges]).float(), expected, atol=1e-4, rtol=1e-4)


def test_eap_is_exact_where_the_metric_is_linear_in_the_receiver():
    """Edges into the logits: the logit difference is linear in the final residual when the final
    norm is an identity (no LayerNorm scale change: ln_f replaced by identity), so EAP's estimate of
    each knockout equals the exact knockout."""
    model = make("ours")
    model.ln_f = torch.nn.Identity()
    clean, bad = batches()
    graph = model_graph(model)
    metric = logit_diff(clean["labels"])
    edges = [(s, graph.n_receivers - 1) for s in range(graph.n_senders)]
    with torch.no_grad():
        corrupt = record(model, bad)[1].wide(model.graph_parts())
        logits = circuit_logits(model, clean, torch.cat([knockouts(graph, [])[:0], knockouts(graph, edges)]), corrupt)
        full = circuit_logits(model, clean, torch.zeros(1, graph.n_senders, graph.n_receivers), corrupt)
    exact = (metric(logits) - metric(full)).sum(1)
    scores = edge_scores(model, clean, metric, "eap", corrupted=bad)
    torch.testing.assert_close(scores[:, -1].float(), exact.float(), atol=1e-4, rtol=1e-5)


def test_mean_and_zero_ablation_values():
    model = make("ours")
    clean, _ = batches()
    with torch.no_grad():
        _, senders = record(model, clean)
    zero = corrupt_record("zero", senders, None, clean["attention_mask"])
    assert zero.input.shape == (1, 1, D) and zero.input.abs().sum() == 0
    mean = corrupt_record("mean", senders, None, clean["attention_mask"])
    real = clean["attention_mask"].bool()
    torch.testing.assert_close(mean.mlp[1][0, 0], senders.mlp[1][real].mean(0))


# --- the graph ---------------------------------------------------------------------------------


def test_graph_matches_eap_igs_indices_and_edge_count():
    graph = Graph(2, 3)
    assert graph.senders == ["input", "a0.h0", "a0.h1", "a0.h2", "m0", "a1.h0", "a1.h1", "a1.h2", "m1"]
    assert graph.receivers[:4] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h0<k>"]
    assert graph.receiver_index("m0") == 9 and graph.receiver_index("logits") == graph.n_receivers - 1
    # EAP-IG's count: per block, the residual so far into 3H head inputs, then into the MLP
    count, upstream = 0, 1
    for _ in range(2):
        count += upstream * 3 * 3
        upstream += 3
        count += upstream
        upstream += 1
    assert graph.n_edges == count + upstream
    assert graph.edge_name(*graph.parse_edge("a0.h1->a1.h2<q>")) == "a0.h1->a1.h2<q>"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("a0.h7->m1", "not in the model's graph"),
        ("a0.h1->m1<q>", "only attention heads have q/k/v"),
        ("a1.h0->a0.h1<q>", "is not an edge"),
        ("a0.h0->a1.h1", "needs <q>, <k> or <v>"),
        ("m1", "is not an edge 'sender->receiver'"),
        ("logits->m1", "logits sends nothing"),
    ],
)
def test_bad_edges_are_one_line_errors(spec, words):
    with pytest.raises(ConfigError, match=words) as info:
        Graph(2, 3).parse_circuit([spec], "objectives.0.edges")
    assert "\n" not in str(info.value) and "objectives.0.edges.0" in str(info.value)


def test_an_empty_circuit_is_an_error():
    with pytest.raises(ConfigError, match="at least one edge"):
        Graph(2, 3).parse_circuit([], "audits.0.circuit")


def test_prune_drops_dangling_edges_as_eap_ig_does():
    graph = Graph(2, 2)
    mask = graph.parse_circuit(["input->a0.h0<q>", "a0.h0->logits", "a0.h1->m1", "m0->logits"], "c")
    kept = graph.names(graph.prune(mask))
    # a0.h1 is fed by nothing and m1 sends nothing; m0 is fed by nothing
    assert kept == ["input->a0.h0<q>", "a0.h0->logits"]


def test_mib_measures_by_hand():
    fractions = (0.0, 0.5, 1.0)
    out = mib_measures(fractions, [2.0, 5.0, 10.0], empty=2.0, full=10.0)
    assert out["faithfulness"] == [0.0, 0.375, 1.0]
    assert math.isclose(out["cpr"], 0.5 * (0 + 0.375) / 2 + 0.5 * (0.375 + 1) / 2)
    assert math.isclose(out["cmd"], 0.5 * (1 + 0.625) / 2 + 0.5 * (0.625 + 0) / 2)
    assert out["fraction_at_0.8"] == 1.0


def test_curve_circuits_take_the_top_edges_by_magnitude():
    graph = Graph(1, 1)
    scores = torch.zeros(graph.n_senders, graph.n_receivers)
    scores[graph.parse_edge("input->logits")] = -3.0
    scores[graph.parse_edge("m0->logits")] = 2.0
    scores[graph.parse_edge("input->m0")] = 1.0
    circuits = curve_circuits(graph, scores, (0.001, 0.5, 1.0))
    assert graph.names(circuits[0]) == ["input->logits"]
    assert set(graph.names(circuits[-1])) == {graph.edge_name(s, r) for s, r in graph.edges}
    assert len(MIB_FRACTIONS) == 10


def test_what_an_attribution_run_keeps_for_its_backward_does_not_grow_with_heads():
    """Every head reads one stream in an attribution run: the forward norms it once and keeps no
    copy per head (the per-head input gradients are built in the backward, a layer at a time)."""

    def saved_bytes(heads: int) -> int:
        torch.manual_seed(0)
        cfg = TransformerConfig(vocab_size=VOCAB, d_model=64, n_heads=heads, n_layers=2, d_mlp=64)
        model = Transformer(cfg)
        ids = torch.randint(0, VOCAB, (4, 12))
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        grads = []
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = graph_forward(
                model, ids, None, torch.full((4, 1), 11), on_receivers=lambda layer, kind, x: grads.append(x)
            )
        return sum(seen.values())

    assert saved_bytes(16) < 1.5 * saved_bytes(2)  # a copy per head's q, k and v input: over 4x
