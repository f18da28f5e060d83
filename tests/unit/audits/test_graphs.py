"""The ``graphs`` audit on a planted model whose graph is known (perfect transcoders, one
token): replacement and completeness 1, the claims hold; with random transcoders on a random
model they do not, and the audit says so."""

import torch

from faithful_train.audits.graphs import GraphsAudit
from faithful_train.intervene.sae import SparseAutoencoder
from faithful_train.intervene.transcoders import Transcoders
from tests.unit.functional.test_attribution_graphs import make, planted


def test_the_audit_measures_a_planted_graph_and_flags_a_random_one():
    model, sets, _ = planted()
    audit = GraphsAudit(transcoders="tc", top_k=6)
    audit.transcoders = sets
    batch = {"input_ids": torch.tensor([[5], [7]]), "answer_pos": torch.tensor([[0], [0]])}
    found = {k: (v * w).sum() / w.sum() for k, (v, w) in audit.measure(model, None, batch).items()}
    assert float(found["replacement_score"]) > 1 - 1e-6 and float(found["completeness"]) > 1 - 1e-6
    assert float(found["intervention_agreement"]) > 1 - 1e-6 and float(found["trusted"]) == 1.0
    assert len(audit._graphs) == 2

    torch.manual_seed(1)
    random = Transcoders({i: SparseAutoencoder(32, 48, k=4, d_out=32) for i in range(2)}).eval()
    for sae in random.values():
        sae.W_dec.data.normal_(0, 0.3)
    audit.transcoders = random
    ids = torch.randint(1, 50, (3, 6), generator=torch.Generator().manual_seed(2))
    values = audit.measure(make("ours"), None, {"input_ids": ids})
    replacement = values["replacement_score"][0]
    assert (replacement < 0.9).all()  # random transcoders: error nodes carry much of the influence
    audit.latest = {"trusted": 0.0, "intervention_agreement": 0.1, "intervention_sign_agreement": 0.5}
    assert "do not all hold" in audit.warnings()[0]
