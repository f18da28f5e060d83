"""Attribution graphs: the replacement model is exact, the adjacency equals an autograd reference
through the real model's own forward (``tests/unit/attribution_reference.py``), pruning and the
scores equal circuit-tracer's dense functions, and a planted model gives its known edge weight,
replacement score 1 and intervention agreement 1."""

import json

import pytest
import torch
from torch import nn

from faithful_train.errors import ConfigError, DataError
from faithful_train.functional.attribution_graphs import attribute, check_claims, graph_json, top_logits
from faithful_train.intervene.engine import run_variants
from faithful_train.intervene.replacement import prompt_state, replacement_logits
from faithful_train.intervene.sae import SparseAutoencoder
from faithful_train.intervene.transcoders import Transcoders, load_transcoders, save_transcoders, spliced
from faithful_train.modeling.hf import HFAdapter
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from tests.unit import attribution_reference as reference
from tests.unit.hf_configs import CONFIGS, VOCAB

D = 32
FAMILIES = ["ours", "gpt2", "llama", "mixtral", "qwen2_moe", "olmoe"]


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "ours":
        model = Transformer(TransformerConfig(vocab_size=VOCAB, d_model=D, n_heads=4, n_layers=2, d_mlp=64))
        for p in model.parameters():
            if p.dim() > 1:
                p.data.normal_(0, 0.2)
    else:
        model = HFAdapter.from_config(name, CONFIGS[name], vocab_size=VOCAB, seed=0)
        for p in model.parameters():
            if p.dim() > 1:
                p.data.normal_(0, 0.2)
    return model.eval()


def transcoders(width: int = D, n_latents: int = 48, k: int = 4, seed: int = 1) -> Transcoders:
    torch.manual_seed(seed)
    by_layer = {i: SparseAutoencoder(width, n_latents, k=k, d_out=width) for i in range(2)}
    for sae in by_layer.values():
        sae.W_dec.data.normal_(0, 0.3)
        sae.b_dec.data.normal_(0, 0.05)
    return Transcoders(by_layer).eval()


def prompt(T: int = 6) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_model_with_error_terms_reproduces_the_logits(family):
    model, sets, ids = make(family), transcoders(), prompt()
    state = prompt_state(model, sets, ids)
    with torch.no_grad():
        real = model(ids, narrow=False)[0].float() if family == "ours" else model(ids)[0].float()
    assert (state.logits - real).abs().max() < 1e-5
    # features recomputed from the frozen stream, active set fixed, plus the error terms
    assert (replacement_logits(state, live=True) - real).abs().max() < 1e-5
    # without the error terms the replacement is not the model (the transcoders are random)
    assert any(state.error(i).abs().max() > 1e-2 for i in range(2))


@pytest.mark.parametrize("family", FAMILIES)
def test_adjacency_matches_autograd_through_the_real_model(family):
    model, sets, ids = make(family), transcoders(), prompt()
    graph = attribute(model, sets, ids, max_sources=None, batch_size=7)
    expected = reference.dense_adjacency(model, sets, ids, graph)
    got = graph.dense().double()
    scale = expected.abs().max()
    assert scale > 0.1
    assert (got - expected).abs().max() <= 1e-4 * scale
    # every target row is there: features (rows of earlier layers' sources) and logits
    assert graph.n_features > 10 and graph.n_logits >= 1


def test_pruning_and_scores_match_circuit_tracer():
    model, sets, ids = make("ours"), transcoders(), prompt(7)
    graph = attribute(model, sets, ids, max_sources=None)
    dense = graph.dense().double()
    node_mask, edge_mask, influence = reference.prune_graph(
        dense, graph.logit_probabilities.double(), graph.n_features, graph.n_pos
    )
    assert torch.allclose(graph.node_influence, influence, atol=1e-9)
    pruned = graph.prune()
    assert torch.equal(pruned.node_mask, node_mask)
    mine = torch.zeros_like(edge_mask)
    mine[graph.rows[pruned.edge_mask], graph.cols[pruned.edge_mask]] = True
    assert torch.equal(mine, edge_mask & (dense != 0))
    replacement, completeness = reference.compute_graph_scores(
        dense, graph.logit_probabilities.double(), graph.n_features, graph.n_pos, graph.n_layers
    )
    assert graph.replacement_score == pytest.approx(replacement, abs=1e-9)
    assert graph.completeness == pytest.approx(completeness, abs=1e-9)
    assert 0 < int(pruned.node_mask[: graph.n_features].sum()) < graph.n_features  # pruning prunes


def test_kept_entries_do_not_change_influence_or_scores():
    """Rows keep their largest ``max_sources`` entries; influence and scores come from every entry."""
    model, sets, ids = make("ours"), transcoders(), prompt(7)
    full = attribute(model, sets, ids, max_sources=None)
    cut = attribute(model, sets, ids, max_sources=5)
    assert int((cut.weights != 0).sum()) < int((full.weights != 0).sum()) / 3
    assert cut.stored_share < 1.0
    assert torch.allclose(cut.node_influence, full.node_influence)
    assert cut.replacement_score == pytest.approx(full.replacement_score)
    assert cut.completeness == pytest.approx(full.completeness)


def test_top_logits_cover_the_probability_mass():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    tokens, probs = top_logits(logits, max_n_logits=10, desired_logit_prob=0.9)
    assert tokens.tolist() == [0, 1, 2] and probs.sum() == pytest.approx(0.95)
    tokens, _ = top_logits(logits, max_n_logits=2, desired_logit_prob=0.99)
    assert tokens.tolist() == [0, 1]


# -- the planted model ------------------------------------------------------------------------------


def planted():
    """Two blocks whose MLPs are ReLU MLPs a transcoder copies exactly (perfect transcoders).
    Feature 0 of layer 0 writes direction u; feature 0 of layer 1 reads u (its encoder row is
    u); the prompt is one token, so attention is the identity on it. The embeddings are long and
    live in the upper half of the stream, the MLPs write and the logits read the lower half: a norm's scale moves
    with the stream's component along itself, so what the MLPs write barely moves it, and the
    frozen norms are the real ones to first order."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, d_model=D, n_heads=4, n_layers=2, d_mlp=16, tie_embeddings=False)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.unembed.weight[:, D // 2 :] = 0  # the logits read the lower half
        model.unembed.weight.mul_(50)
        model.tok_emb.weight[:, : D // 2] = 0
        model.tok_emb.weight.mul_(5000)
    sets = {}
    u = torch.zeros(D)
    u[:2] = torch.tensor([1.0, -1.0])
    for i, block in enumerate(model.blocks):
        mlp = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D))
        with torch.no_grad():
            mlp[0].bias.fill_(2.0)  # every latent active with margin
            mlp[2].weight.mul_(3)
            mlp[2].weight[D // 2 :] = 0  # MLPs write in the lower half
            if i == 0:
                mlp[2].weight[:, 0] = 4 * u  # layer 0, feature 0 writes u
            else:
                mlp[0].weight[0] = u  # layer 1, feature 0 reads u
        block.mlp = mlp
        sae = SparseAutoencoder(D, 16, activation="relu", d_out=D, normalize_decoder=False)
        with torch.no_grad():
            sae.encoder.weight.copy_(mlp[0].weight)
            sae.encoder.bias.copy_(mlp[0].bias)
            sae.W_dec.copy_(mlp[2].weight.T)
            sae.b_dec.copy_(mlp[2].bias)
        sets[i] = sae
    return model, Transcoders(sets).eval(), u


def test_planted_model_exact_edges_replacement_one_and_claims_hold():
    model, sets, u = planted()
    ids = torch.tensor([[5]])
    graph = attribute(model, sets, ids, max_sources=None)
    assert graph.replacement_score == pytest.approx(1.0, abs=1e-6)  # perfect transcoders: no error influence
    assert graph.completeness == pytest.approx(1.0, abs=1e-6)
    # the known edge: layer-0 feature 0 -> layer-1 feature 0, through block 1's attention (one
    # token: its pattern is 1, so the path is I + W_O W_V J_ln1) and ln2, both frozen
    state = graph.extra["state"]
    block = model.blocks[1]

    def jacobian(ln, reference):
        std = (reference.var(-1, unbiased=False) + ln.eps).sqrt()
        centring = torch.eye(D) - torch.full((D, D), 1.0 / D)
        return torch.diag(ln.weight.detach()) @ centring / std

    j1 = jacobian(block.ln1, state.resid_pre[1][0, 0])
    j2 = jacobian(block.ln2, state.resid_mid[1][0, 0])
    qkv = block.attn.qkv.weight.detach()
    w_v = qkv[2 * D : 3 * D]
    w_o = block.attn.proj.weight.detach()
    path = j2 @ (torch.eye(D) + w_o @ w_v @ j1)
    source = [i for i in range(graph.n_features) if graph.features[i].tolist() == [0, 0, 0]][0]
    target = [i for i in range(graph.n_features) if graph.features[i].tolist() == [1, 0, 0]][0]
    a = float(graph.activations[source])
    expected = a * float(u @ path @ (4 * u))
    assert float(graph.dense()[target, source]) == pytest.approx(expected, rel=1e-4)
    assert abs(expected) > 0.01
    graph.prune(node_threshold=1.0, edge_threshold=1.0)
    claims = check_claims(model, graph, top_k=6)
    assert claims.spearman == pytest.approx(1.0)
    assert claims.sign_agreement == 1.0
    assert claims.spearman_frozen_attention == pytest.approx(1.0)  # one token: patterns cannot move
    assert torch.allclose(claims.predicted, claims.measured, rtol=0.05, atol=1e-3)


def test_spliced_variants_replace_each_layer_and_ablate_one_feature():
    model, sets, ids = make("ours"), transcoders(), prompt()
    batch = {"input_ids": ids}
    read = torch.tensor([[ids.shape[1] - 1]])
    with torch.no_grad():
        both = run_variants(model, batch, 3, spliced(sets, [[0], [1], []]), read=read)
        alone = [run_variants(model, batch, 1, spliced(sets, [[i]]), read=read) for i in range(2)]
        clean = run_variants(model, batch, 1, {}, read=read)
    assert torch.allclose(both[0], alone[0], atol=1e-5) and torch.allclose(both[1], alone[1], atol=1e-5)
    assert not torch.allclose(alone[0], clean, atol=1e-3) and torch.allclose(both[2], clean, atol=1e-5)


def test_graph_json_has_circuit_tracer_node_ids_and_links():
    model, sets, ids = make("ours"), transcoders(), prompt()
    graph = attribute(model, sets, ids)
    graph.prune()
    data = json.loads(json.dumps(graph_json(graph, [f"t{i}" for i in range(6)], "slug")))
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit", "cross layer transcoder"} <= kinds
    ids_ = {n["node_id"] for n in data["nodes"]}
    assert all(link["source"] in ids_ and link["target"] in ids_ for link in data["links"])
    feature = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index, pos = (int(x) for x in feature["node_id"].split("_"))
    assert feature["feature"] == (layer + index) * (layer + index + 1) // 2 + index  # cantor pairing
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["node_id"] == f"3_{int(graph.logit_tokens[0])}_5" and logit["layer"] == "3"
    assert sum(n["feature_type"] == "embedding" for n in data["nodes"]) == 6
    assert data["metadata"]["info"]["replacement_score"] == pytest.approx(graph.replacement_score)


def test_transcoder_files_round_trip_and_bad_folders(tmp_path):
    sets = transcoders()
    save_transcoders(sets, tmp_path / "tc")
    loaded = load_transcoders(tmp_path / "tc", D, 2)
    assert loaded.layers == [0, 1]
    assert torch.equal(loaded.at(1).W_dec, sets.at(1).W_dec)
    cfg = json.loads((tmp_path / "tc" / "layer1" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.mlp.in" and cfg["metadata"]["hook_name_out"] == "blocks.1.mlp.out"
    with pytest.raises(DataError, match="reads 32 dimensions, the site has 64"):
        load_transcoders(tmp_path / "tc", 64, 2)
    with pytest.raises(DataError, match="holds no transcoder"):
        load_transcoders(tmp_path, D, 2)
    with pytest.raises(DataError, match="layer 1; the model has 1 layers"):
        load_transcoders(tmp_path / "tc", D, 1)
    with pytest.raises(ConfigError, match=r"none at layers \[1\]"):
        prompt_state(make("ours"), Transcoders({0: sets.at(0)}), prompt())
