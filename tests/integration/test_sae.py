"""The online SAE from the CLI: train beside the model, write SAELens files, audit them again
from a checkpoint through the files; a folder in another layout, or an SAE whose width does not
fit the site, is one line and exit 2."""

from __future__ import annotations

import json

import pytest

from faithful_train.commands.cli import main
from tests.integration.test_cli import assert_fit_fails_in_one_line

TINY = [
    "trainer.max_steps=30",
    "trainer.val_every=15",
    "trainer.progress_bar=false",
    "audits.0.every_n_steps=15",
    "audits.0.n_examples=64",
    "data.val_size=32",
    "data.batch_size=16",
    "logger.wandb.mode=disabled",
]


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo)


def test_sae_trains_writes_saelens_files_and_audits_from_them(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "-c", "configs/sae.yaml", "--run-dir", str(run), *TINY]) == 0
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    for key in (
        "audit/sae/fvu",
        "audit/sae/l0",
        "audit/sae/dead",
        "audit/sae/ce_recovered",
        "audit/sae/kl_recovered",
        "train/objective/sae/fvu",
    ):
        assert key in metrics, key
    assert metrics["audit/sae/l0"] <= 16
    cfg = json.loads((run / "saes" / "sae" / "cfg.json").read_text())
    assert (
        cfg["architecture"] == "topk" and cfg["d_sae"] == 128 and cfg["metadata"]["hook_name"] == "blocks.1.resid_post"
    )
    # the same checkpoint audited through the files, by a config with no objective
    again = tmp_path / "again"
    overrides = [
        "objectives=[]",
        f"audits=[{{name: sae, path: {run / 'saes' / 'sae'}, site: blocks.1.resid_post, n_examples: 64, "
        f"variables: {{domain: [-1]}}}}]",
    ]
    assert (
        main(
            [
                "audit",
                "-c",
                "configs/sae.yaml",
                "--run-dir",
                str(again),
                "--ckpt",
                str(run / "checkpoints" / "last.ckpt"),
                *overrides,
            ]
        )
        == 0
    )
    audited = json.loads((again / "summary.json").read_text())["metrics"]
    for name in ("fvu", "l0", "dead", "ce_recovered"):
        assert audited[f"audit/sae/{name}"] == pytest.approx(metrics[f"audit/sae/{name}"], rel=1e-5, abs=1e-6), name
    assert (
        0.5 <= audited["audit/sae/auroc/domain"] <= 1 and 0 <= audited["audit/sae/latent_iia/domain"] <= 1
    )  # its latents, a site from the files


def test_sae_files_of_another_layout_or_width_are_one_line(tmp_path, capsys):
    for name in "ab":
        (tmp_path / name).mkdir()
    other = tmp_path / "sparsify_layout"
    other.mkdir()
    (other / "sae.safetensors").write_bytes(b"x")
    (other / "cfg.json").write_text("{}")
    audit = [f"audits=[{{name: sae, path: {other}, site: blocks.1.resid_post}}]", "objectives=[]"]
    assert_fit_fails_in_one_line(
        "configs/sae.yaml", tmp_path / "a", capsys, audit, "is not an SAE in SAELens's layout", "sae.safetensors"
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "-c",
                "configs/sae.yaml",
                "--run-dir",
                str(run),
                *TINY,
                "trainer.max_steps=2",
                "audits.0.every_n_steps=0",
            ]
        )
        == 0
    )
    narrow = [
        f"audits=[{{name: sae, path: {run / 'saes' / 'sae'}, site: blocks.1.resid_post}}]",
        "objectives=[]",
        "model={preset: dense-tiny, d_model: 32}",
    ]
    assert_fit_fails_in_one_line(
        "configs/sae.yaml", tmp_path / "b", capsys, narrow, "reads 64 dimensions, the site has 32", "audits.0"
    )


def test_a_detached_sae_leaves_the_model_as_it_would_be(tmp_path):
    """The same run with and without the sae objective ends with the same model weights."""
    import torch

    runs = {}
    for name, extra in (("with", []), ("without", ["objectives=[]", "audits=[]"])):
        run = tmp_path / name
        assert (
            main(
                [
                    "fit",
                    "-c",
                    "configs/sae.yaml",
                    "--run-dir",
                    str(run),
                    *TINY,
                    "trainer.max_steps=12",
                    "audits.0.every_n_steps=0",
                    *extra,
                ]
            )
            == 0
        )
        state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        runs[name] = {k: v for k, v in state.items() if k.startswith("model.")}
    assert runs["with"].keys() == runs["without"].keys()
    assert all(torch.equal(runs["with"][k], runs["without"][k]) for k in runs["with"])


def test_an_interchange_audit_runs_on_sae_latents(tmp_path):
    """The objective's latents are a site (``<site>.sae``) that an alignment can name."""
    run = tmp_path / "run"
    alignment = (
        "{left: {site: blocks.0.resid_post.sae, positions: [3], dims: [0, 4]}, "
        "right: {site: blocks.0.resid_post.sae, positions: [3], dims: [4, 8]}}"
    )
    audits = f"audits=[{{name: interchange, every_n_steps: 10, n_examples: 32, controls: [], alignment: {alignment}}}]"
    overrides = ["task={name: hierarchical_equality}", "objectives.0.site=blocks.0.resid_post", audits]
    assert (
        main(["fit", "-c", "configs/sae.yaml", "--run-dir", str(run), *TINY, "trainer.max_steps=10", *overrides]) == 0
    )
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert 0 <= metrics["audit/interchange/iia/left"] <= 1 and "audit/interchange/iia/right" in metrics


def test_latent_alignment_and_latent_iia_from_a_config(tmp_path):
    """configs/sae-iit.yaml's audit reports AUROC per variable value, latent IIA and the ladder."""
    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "-c",
                "configs/sae-iit.yaml",
                "--run-dir",
                str(run),
                *TINY,
                "trainer.max_steps=10",
                "audits.0.every_n_steps=10",
            ]
        )
        == 0
    )
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    for v in ("left", "right"):
        for name in (
            f"auroc/{v}",
            f"auroc/{v}/0",
            f"auroc/{v}/1",
            f"latent_iia/{v}",
            f"latent_iia/{v}/top1",
            f"latent_iia/{v}/top128",
            f"latents_needed/{v}",
        ):
            assert f"audit/sae/{name}" in metrics, name
        assert 0.5 <= metrics[f"audit/sae/auroc/{v}"] <= 1 and 0 <= metrics[f"audit/sae/latent_iia/{v}"] <= 1


def test_interchange_training_on_sae_latents_trains_the_model_and_the_sae(tmp_path):
    """configs/sae-iit.yaml aligns IIT with the SAE's latents (blocks.0.resid_post.sae): its
    loss reaches the model and the SAE (after one step, both differ from the same run with that
    IIT's weight 0, the residual IIT off in both), and the objectives may come in any
    order (the sae objective, which adds the site, binds first)."""
    import torch

    short = [*TINY, "trainer.max_steps=4", "audits=[]"]
    one_step = [*short, "trainer.max_steps=1", "objectives.2.weight=0"]  # the residual IIT off
    states = {}
    for name, extra in (("iit", []), ("off", ["objectives.1.weight=0"])):
        run = tmp_path / name
        assert main(["fit", "-c", "configs/sae-iit.yaml", "--run-dir", str(run), *one_step, *extra]) == 0
        states[name] = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model = [k for k in states["iit"] if k.startswith("model.blocks.0.")]
    sae = [k for k in states["iit"] if k.startswith("objective_modules.sae.")]
    assert model and sae
    for keys in (model, sae):
        assert any(not torch.equal(states["iit"][k], states["off"][k]) for k in keys), keys[0]
    from omegaconf import OmegaConf

    cfg = OmegaConf.load("configs/sae-iit.yaml")
    assert [o.get("label", o.name) for o in cfg.objectives] == ["sae", "interchange", "residual"]
    cfg.objectives = list(reversed(cfg.objectives))
    OmegaConf.save(cfg, tmp_path / "swapped.yaml")
    assert main(["fit", "-c", str(tmp_path / "swapped.yaml"), "--run-dir", str(tmp_path / "swapped"), *short]) == 0


def test_an_sae_from_files_is_a_fixed_site_and_caft_ablates_its_latents(tmp_path):
    """An SAE brought from files (``path``, ``train: false``) stays as it was, its latents are a
    site (an interchange audit names them), and CAFT ablates the latents aligned with the tag."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    task = ["task={name: decoy_objects}", "objectives.0.site=blocks.0.resid_post"]
    assert (
        main(
            ["fit", "-c", "configs/sae.yaml", "--run-dir", str(run), *TINY, "trainer.max_steps=20", "audits=[]", *task]
        )
        == 0
    )
    folder = run / "saes" / "sae"
    before = load_file(str(folder / "sae_weights.safetensors"))
    again = tmp_path / "again"
    objectives = (
        f"objectives=[{{name: sae, site: blocks.0.resid_post, path: {folder}, train: false}},"
        " {name: caft, concept: decoy, min_auroc: 0.55, schedule: {kind: warmup, start: 5, steps: 0}}]"
    )
    audits = (
        "audits=[{name: interchange, every_n_steps: 10, n_examples: 32, controls: [], "
        "alignment: {decoy: {site: blocks.0.resid_post.sae, dims: [0, 8]}}}]"
    )
    assert (
        main(
            [
                "fit",
                "-c",
                "configs/sae.yaml",
                "--run-dir",
                str(again),
                *TINY,
                "trainer.max_steps=12",
                *task,
                objectives,
                audits,
            ]
        )
        == 0
    )
    after = load_file(str(again / "saes" / "sae" / "sae_weights.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # fixed: not trained
    metrics = json.loads((again / "summary.json").read_text())["metrics"]
    assert metrics["train/objective/caft/ablated"] >= 1 and metrics["train/objective/caft/auroc"] >= 0.55
    assert "audit/interchange/iia/decoy" in metrics and "train/objective/sae/fvu" in metrics


def test_caft_names_an_sae_objective_in_one_line(tmp_path, capsys):
    for name in "ab":
        (tmp_path / name).mkdir()
    objectives = "objectives=[{name: caft, concept: decoy, sae: nowhere}]"
    assert_fit_fails_in_one_line(
        "configs/caft-decoy.yaml",
        tmp_path / "a",
        capsys,
        [objectives, "audits=[]"],
        "no sae objective labelled 'nowhere'",
        "sae objectives: none",
    )
    objectives = "objectives=[{name: caft, concept: colour_of_tag}]"
    assert_fit_fails_in_one_line(
        "configs/caft-decoy.yaml", tmp_path / "b", capsys, [objectives, "audits=[]"], "colour_of_tag", "decoy"
    )


@pytest.mark.parametrize("config, extra", [
    ("configs/caft-decoy.yaml",
     ["objectives.1.schedule.start=5", "audits.1.n_examples=64", "audits.1.every_n_steps=15"]),
    ("configs/sae-baseline.yaml", []),
    ("configs/caft-decoy-baseline.yaml", []),
])  # fmt: skip
def test_the_sae_configs_run(tmp_path, config, extra):
    run = tmp_path / "run"
    assert main(["fit", "-c", config, "--run-dir", str(run), *TINY, *extra]) == 0
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    if config.endswith("caft-decoy-baseline.yaml"):
        assert "val/task_acc" in metrics and not any(k.startswith("train/objective") for k in metrics)
    elif "caft" in config:
        assert metrics["train/objective/caft/ablated"] >= 1 and "audit/sae/latent_iia/decoy" in metrics
    else:
        assert "audit/sae/latents_needed/left" in metrics


def test_optim_freeze_keeps_the_named_parameters_fixed(tmp_path, capsys):
    """CAFT's configs fix the token embeddings: after 1 and after 6 steps they are the same,
    while the rest of the model moved; a pattern that names no parameter is one line and exit 2."""
    import torch

    states = []
    for steps in (1, 6):
        run = tmp_path / f"run{steps}"
        args = [
            "fit",
            "-c",
            "configs/caft-decoy-baseline.yaml",
            "--run-dir",
            str(run),
            *TINY,
            f"trainer.max_steps={steps}",
            "audits=[]",
        ]
        assert main(args) == 0
        states.append(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    assert torch.equal(states[0]["model.tok_emb.weight"], states[1]["model.tok_emb.weight"])
    assert not torch.equal(states[0]["model.pos_emb.weight"], states[1]["model.pos_emb.weight"])
    (tmp_path / "bad").mkdir()
    assert_fit_fails_in_one_line(
        "configs/caft-decoy-baseline.yaml",
        tmp_path / "bad",
        capsys,
        ["optim.freeze=[tok_emb.weight, embeddings.*]"],
        "optim.freeze.1",
        "tok_emb.weight",
    )
