"""The ``patching`` audit: its figures and artifacts, noising, exact-only and sharded runs, and its
bad inputs as one clear line."""

from __future__ import annotations

import csv

import pytest

from faithful_train.audits.patching import PatchingAudit
from faithful_train.errors import ConfigError, UnknownNameError
from faithful_train.tasks.hierarchical_equality import HierarchicalEquality
from tests.conftest import tiny_transformer


def _trained_enough(task: HierarchicalEquality):
    return tiny_transformer(task.vocab_size, max_seq_len=task.seq_len, seed=1).eval()


def test_audit_figures_and_artifacts(tmp_path):
    task = HierarchicalEquality()
    model = _trained_enough(task)
    audit = PatchingAudit(n_examples=64, batch_size=32, verify_top=5, log_cells=True)
    audit.bind(model, task)
    names = audit.metric_names(task)
    results = audit.evaluate(model, task)
    assert set(results) == set(names)
    for key in (
        "clean",
        "corrupted",
        "max/heads/layer1",
        "max/resid_pre/layer0",
        "atp/spearman",
        "atp/missed",
        "atp/spearman_all",
        "circuit/cpr",
        "circuit/cmd",
        "cell/heads/layer0/pos3/head1",
    ):
        assert key in results, key
    assert all(v == v for v in results.values())  # no NaN: the clean and corrupted answers differ
    assert 0.0 <= results["atp/missed"] <= 1.0 and -1.0 <= results["atp/spearman"] <= 1.0
    audit.remember(results, step=7)

    class WandbLike:  # what a WandbLogger offers
        def __init__(self):
            self.calls = []

        def log_image(self, **kwargs):
            self.calls.append(("image", kwargs))

        def log_table(self, **kwargs):
            self.calls.append(("table", kwargs))

    logger = WandbLike()
    audit.write_artifacts(model, task, tmp_path, 7, [logger])
    (_, image), (_, table) = logger.calls
    assert (
        image["key"] == "audit/patching/map"
        and image["images"] == [str(tmp_path / "patching" / "step000007.png")]
        and image["step"] == 7
    )
    assert table["columns"] == ["component", "layer", "position", "head", "exact", "atp"] and len(table["data"]) == len(
        audit.cells
    )
    with open(tmp_path / "patching" / "step000007.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["component", "layer", "position", "head", "exact", "atp"]
    assert len(rows) == len(audit.cells) == 2 * 4 * 3 + 2 * 4 * 4
    heads = [r for r in rows if r["component"] == "heads"]
    assert {r["head"] for r in heads} == {"0", "1", "2", "3"} and all(r["exact"] and r["atp"] for r in rows)
    assert (tmp_path / "patching" / "step000007.png").read_bytes()[:4] == b"\x89PNG"

    # AtP only: the top-k cells are re-run exactly (missed within the verified set)
    atp_only = PatchingAudit(
        n_examples=64, batch_size=64, exact=False, verify_top=4, circuit=False, components=["resid_pre", "mlp.out"]
    )
    atp_only.bind(model, task)
    figures = atp_only.evaluate(model, task)
    assert set(figures) == set(atp_only.metric_names(task)) and "atp/spearman_all" not in figures
    assert 0.0 <= figures["atp/missed"] <= 1.0


def test_audit_noising_and_exact_only_and_sharding():
    task = HierarchicalEquality()
    model = _trained_enough(task)
    audit = PatchingAudit(
        n_examples=32,
        batch_size=16,
        atp=False,
        direction="noising",
        metric="acc",
        components=["resid_pre"],
        positions=[1, 3, "answer"],
    )
    audit.bind(model, task)
    assert audit.metric_names(task) == ["clean", "corrupted", "max/resid_pre/layer0", "max/resid_pre/layer1"]
    whole = audit.evaluate(model, task)
    assert whole["max/resid_pre/layer0"] >= 0.0
    shards = PatchingAudit(
        n_examples=32,
        batch_size=8,
        atp=False,
        direction="noising",
        metric="acc",
        components=["resid_pre"],
        positions=[1, 3, "answer"],
    )
    shards.bind(model, task)
    assert shards.evaluate(model, task) == pytest.approx(whole, nan_ok=True)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"components": ["resid_post"]},
            UnknownNameError,
            "unknown patching component 'resid_post'; valid: attn.out, heads, mlp.out, resid_pre",
        ),
        ({"metric": "loss"}, UnknownNameError, "unknown patching metric 'loss'"),
        (
            {"direction": "sideways"},
            UnknownNameError,
            "unknown patching direction 'sideways'; valid: denoising, noising",
        ),
        ({"ablation": "mode"}, UnknownNameError, "unknown ablation 'mode'"),
        ({"atp": False, "exact": False}, ConfigError, "atp and exact are both false"),
        ({"metric": "acc"}, ConfigError, "metric 'acc' has no gradient for atp"),
        ({"verify_top": 0}, ConfigError, "verify_top must be an int >= 1 (or null), got 0"),
        (
            {"metric": "kl", "direction": "noising"},
            ConfigError,
            "atp with metric 'kl' under noising estimates 0 everywhere",
        ),
        ({"positions": [1.5]}, ConfigError, "position 1.5 is not an int"),
        ({"positions": ["middle"]}, ConfigError, "positions 'middle'"),
        ({"positions": []}, ConfigError, "positions is empty"),
    ],
)
def test_bad_config_values_raise_one_clear_line(kwargs, error, message):
    with pytest.raises(error) as info:
        PatchingAudit(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"positions": [9]}, "position 9 is outside the task's sequence length 4"),
        ({"positions": [{"span": "left"}]}, "unknown span of task 'hierarchical_equality'"),
        ({"corrupt": ["middle"]}, "unknown variable of task 'hierarchical_equality' 'middle'; valid: left, right"),
        ({"thresholds": {"circuit/cpl": 0.5}}, "unknown metric of audit 'patching' 'circuit/cpl'"),
    ],
)
def test_bad_values_against_the_task_raise_at_bind(kwargs, message):
    task = HierarchicalEquality()
    with pytest.raises((ConfigError, UnknownNameError)) as info:
        PatchingAudit(**kwargs).bind(_trained_enough(task), task)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_registered_by_name():
    from faithful_train.registry import AUDITS

    assert AUDITS["patching"] == "faithful_train.audits.patching:PatchingAudit"
