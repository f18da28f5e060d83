"""Router audit on a hand-set MoE whose routing and experts are known.

The planted model reads a domain marker ``d`` and routes it (top-1) to expert ``d``, whose
output writes the answer ``4 + d``: every figure of the audit has a known value.
"""

import json

import pytest
import torch

from faithful_train.audits.router import RouterAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.modeling.transformer import Transformer, TransformerConfig
from faithful_train.tasks.base import Task
from tests.conftest import unperturbed_task

D = 4  # domains = experts


class PlantedDomains(Task):
    """``[d, d] -> 4 + d``; ``perturb`` keeps the input (``shift=False``) or changes the domain."""

    name = "planted_domains"
    variables = ("domain",)

    def __init__(self, shift: bool = False):
        self.shift = shift

    vocab_size = 2 * D
    seq_len = 2
    answer_tokens = tuple(range(D, 2 * D))
    concepts = {"domain": ("a", "b", "c", "d")}

    def generate(self, n, generator):
        domain = (torch.arange(n) + torch.randint(0, D, (1,), generator=generator)) % D  # balanced
        return {
            "input_ids": domain[:, None].repeat(1, 2),
            "labels": D + domain,
            "concept/domain": domain,
            "var/domain": domain,
        }

    def label_from_variables(self, variables):
        return D + variables["domain"]

    def perturb(self, batch, generator):
        return (batch["input_ids"] + 1) % D if self.shift else batch["input_ids"].clone()


def planted_model() -> Transformer:
    cfg = TransformerConfig(
        vocab_size=2 * D, max_seq_len=2, d_model=16, n_layers=1, n_heads=2, d_mlp=4, n_experts=D, top_k=1
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in (model.blocks[0].ln1, model.blocks[0].ln2, model.ln_f):
            ln.weight.fill_(1.0)
        model.tok_emb.weight[:D, :D] = torch.eye(D)  # marker d -> dim d
        moe = model.blocks[0].mlp
        moe.router.weight[:, :D] = 5 * torch.eye(D)  # route marker d to expert d
        for e, expert in enumerate(moe.experts):
            expert.down.bias[8 + e] = 10.0  # expert e writes dim 8 + e ...
            model.unembed.weight[D + e, 8 + e] = 1.0  # ... which reads out answer 4 + e
    return model.eval()


@pytest.fixture(scope="module")
def results():
    task, model = PlantedDomains(), planted_model()
    audit = RouterAudit(n_examples=64, batch_size=16)
    audit.bind(model, task)
    return audit.evaluate(model, task)


def test_planted_model_solves_the_task(results):
    assert results["task_acc"] == 1.0
    assert all(results[f"task_acc/{v}"] == 1.0 for v in "abcd")


def test_routing_statistics(results):
    assert results["expert_concept_nmi"] == pytest.approx(1.0)
    assert results["entropy"] < 1e-3
    assert results["load_cv"] == pytest.approx(0.0) and results["load_max_mean"] == pytest.approx(1.0)
    assert results["dead_experts"] == 0
    assert results["routing_stability"] == 1.0 and results["routing_stability_topk"] == 1.0


def test_ablating_a_domains_expert_hurts_only_that_domain(results):
    for e, own in enumerate("abcd"):
        for v in "abcd":
            assert results[f"ablation/layer0/expert{e}/{v}"] == (1.0 if v == own else 0.0)
        assert results[f"ablation/layer0/expert{e}"] == pytest.approx(0.25)
    assert results["ablation/own_drop"] == 1.0 and results["ablation/other_drop"] == 0.0


def test_routing_stability_sees_changed_routes():
    task, model = PlantedDomains(shift=True), planted_model()
    audit = RouterAudit(n_examples=32, batch_size=32, ablation=False)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert results["routing_stability"] == 0.0 and results["routing_stability_topk"] == 0.0
    assert not any(k.startswith("ablation") for k in results)


def test_dead_experts_and_nmi_without_specialisation():
    task, model = PlantedDomains(), planted_model()
    with torch.no_grad():
        model.blocks[0].mlp.router.weight.zero_()  # every token ties -> expert 0
    audit = RouterAudit(n_examples=32, batch_size=32, stability=False, ablation=False)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert results["dead_experts"] == D - 1
    assert results["expert_concept_nmi"] == 0.0
    assert results["load_max_mean"] == pytest.approx(D)


def test_selection_bias_moves_the_choice_and_the_audit_sees_it():
    task, model = PlantedDomains(), planted_model()
    model.selection_bias(0).copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))  # everything to expert 3
    audit = RouterAudit(n_examples=32, batch_size=32, stability=False, ablation=False)
    audit.bind(model, task)
    results = audit.evaluate(model, task)
    assert results["dead_experts"] == D - 1 and results["task_acc"] == 0.25


def test_token_choices_are_written(tmp_path):
    task, model = PlantedDomains(), planted_model()
    audit = RouterAudit(n_examples=8, n_show=3)
    audit.bind(model, task)

    class TableLogger:
        tables = []

        def log_table(self, **kwargs):
            self.tables.append(kwargs)

    logger = TableLogger()
    audit.write_artifacts(model, task, tmp_path, 7, [logger])
    rows = [json.loads(line) for line in (tmp_path / "router" / "choices_step000007.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2
    data = audit.data(task)
    for row in rows:
        domain = int(data["concept/domain"][row["example"]])
        assert row["concept"] == "abcd"[domain] and row["token"] == str(domain)
        assert row["layers"]["0"]["experts"] == [domain] and row["layers"]["0"]["probs"][0] > 0.99
    (table,) = logger.tables
    assert table["key"] == "audit/router/choices" and len(table["data"]) == 6 and table["step"] == 7


def test_bad_inputs_name_the_valid_choices():
    model = planted_model()
    with pytest.raises(UnknownNameError, match="'colour'.*domain"):
        RouterAudit(concept="colour").bind(model, PlantedDomains())
    with pytest.raises(UnknownNameError, match="MoE layer.*'3'.*0"):
        RouterAudit(layers=[3]).bind(model, PlantedDomains())
    dense = Transformer(TransformerConfig(vocab_size=8, max_seq_len=2, d_model=16, n_heads=2))
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        RouterAudit().bind(dense, PlantedDomains())
    with pytest.raises(ConfigError, match="no position-aligned perturbations"):
        RouterAudit().bind(model, unperturbed_task(n_symbols=4))
