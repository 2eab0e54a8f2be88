"""Self-supervised pretraining: a deconv job's encoder starts a cnn (`model.init_from`), frozen or not;
the encoder and the cnn must agree. Real training, real MLflow store, weights read back from it."""

from __future__ import annotations

import pytest
import torch

from raybloom import engine, models, runner, spec
from raybloom.job import prepare_job

from conftest import JOBS, cli


def weights(client, run_id: str, tmp_path) -> dict:
    path = client.download_artifacts(run_id, models.WEIGHTS_ARTIFACT, str(tmp_path / run_id))
    return torch.load(path, weights_only=True)["state_dict"]


def convs(state: dict, prefix: str = "") -> list[torch.Tensor]:
    return [v for k, v in state.items() if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 4]


@pytest.fixture
def pretrained(client, tmp_path):
    """A short pretraining (3 epochs, registered as digits-encoder) and its encoder's conv weights."""
    s = spec.load(JOBS / "pretrain_deconv_digits.yaml", ["train.epochs=3", "tracking.register_as=digits-encoder"])
    run_id = runner.train_in_process(s).run_id
    return run_id, convs(weights(client, run_id, tmp_path), "encoder.")


def finetune(*overrides: str) -> spec.JobSpec:
    return spec.load(JOBS / "finetune_cnn_digits.yaml", ["train.epochs=4", "data.train_limit=100",
                                                          "tracking.log_model=true", *overrides])


def test_finetuning_starts_from_the_encoder_and_a_frozen_one_stays(client, tmp_path, pretrained):
    run_id, encoder = pretrained
    assert len(encoder) == 2 and [w.shape[0] for w in encoder] == [32, 64]
    for source in (run_id, f"runs:/{run_id}/model", "models:/digits-encoder/1"):
        job = prepare_job(finetune(f"model.init_from={source}"))
        model = engine.build(job.spec, job.dataset)
        assert all(torch.equal(a, b) for a, b in zip(convs(model.state_dict()), encoder)), source
    frozen = weights(client, runner.train_in_process(finetune(f"model.init_from={run_id}", "model.freeze_encoder=true")).run_id,
                     tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(convs(frozen), encoder))  # the encoder did not move
    plain = prepare_job(finetune())
    engine.seed_everything(plain.spec.seed)  # the head's start, as the training drew it
    start = engine.build(plain.spec, plain.dataset).state_dict()
    head = [k for k, v in start.items() if v.dim() == 2][-1]
    assert not torch.equal(frozen[head], start[head])  # the head trained
    tuned = weights(client, runner.train_in_process(finetune(f"model.init_from={run_id}")).run_id, tmp_path)
    assert not torch.equal(convs(tuned)[0], encoder[0])  # not frozen: fine-tuned


def test_an_encoder_that_does_not_match_the_cnn_exits_2_naming_both(client, pretrained):
    run_id, _ = pretrained
    r = cli("run", str(JOBS / "finetune_cnn_digits.yaml"), f"model.init_from={run_id}", "model.filters=[16,32]")
    assert r.returncode == 2, r.stderr
    assert f"run {run_id}" in r.stderr and "filters [32, 64]" in r.stderr and "filters [16, 32]" in r.stderr
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1  # nothing new opened
    r = cli("run", str(JOBS / "finetune_cnn_digits.yaml"), "model.init_from=0123456789abcdef0123456789abcdef")
    assert r.returncode == 2 and "no MLflow run 0123456789abcdef0123456789abcdef" in r.stderr
    r = cli("run", str(JOBS / "pretrain_deconv_digits.yaml"), f"model.init_from={run_id}")
    assert r.returncode == 2 and "init_from" in r.stderr and "cnn" in r.stderr
