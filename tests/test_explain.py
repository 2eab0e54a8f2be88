"""Explanations of finished classifiers (`tracking.explain`): Captum's maps as plots/saliency.png and the
deletion check `explain_deletion_gap`, read back from the real MLflow store; the masking on known answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from raybloom import explain, runner, spec

from conftest import JOBS

EXPLAIN_METRICS = ("explain_deletion_gap", "explain_deletion_top_drop", "explain_deletion_random_drop")


def _plots(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, "plots")}


def test_cnn_digits_run_logs_saliency_maps_and_a_positive_deletion_gap(client, tmp_path):
    s = spec.load(JOBS / "cnn_digits.yaml", ["train.epochs=6", "tracking.log_model=false"])
    summary = runner.train_in_process(s)
    run = client.get_run(summary.run_id)
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert m["test_accuracy"] >= 0.9, m  # a model worth explaining
    # masking the top 15% |integrated gradients| pixels hurts far more than masking as many random ones
    assert m["explain_deletion_gap"] > 0.2, m
    assert m["explain_deletion_gap"] == pytest.approx(m["explain_deletion_top_drop"] - m["explain_deletion_random_drop"])
    steps = {k: [p.step for p in client.get_metric_history(summary.run_id, k)] for k in ("explain_deletion_gap", "test_loss")}
    assert steps["explain_deletion_gap"] == steps["test_loss"] == [int(m["stopped_epoch"])]  # with the final metrics
    assert "plots/saliency.png" in _plots(client, summary.run_id)
    png = Path(client.download_artifacts(summary.run_id, "plots/saliency.png", str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # 20 inputs x 3 panels


@pytest.mark.parametrize("job, overrides", [("linear_gd.yaml", ["train.epochs=5"]),
                                            ("deconv_digits.yaml", ["train.epochs=1", "tracking.log_model=false"])])
def test_regression_and_reconstruction_runs_log_no_explanations(client, job, overrides):
    summary = runner.train_in_process(spec.load(JOBS / job, overrides))
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert "test_loss" in run.data.metrics  # the run was recorded...
    assert not set(EXPLAIN_METRICS) & set(run.data.metrics)  # ...without explanations
    assert "plots/saliency.png" not in _plots(client, summary.run_id) and "plots/loss_curves.png" in _plots(client, summary.run_id)


def test_tracking_explain_false_turns_explanations_off(client):
    s = spec.load(JOBS / "mlp_digits.yaml", ["train.epochs=2", "tracking.explain=false", "tracking.log_model=false"])
    summary = runner.train_in_process(s)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert not set(EXPLAIN_METRICS) & set(run.data.metrics)
    assert "plots/saliency.png" not in _plots(client, summary.run_id)
    assert "plots/confusion_matrix.png" in _plots(client, summary.run_id)


def test_top_k_masks_the_largest_absolute_attributions():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.0, 0.2, 0.8, 0.4],
                           [5.0, 1.0, 2.0, 3.0, 4.0, 0.5, 0.6, 0.7]])
    mask = explain.top_k_mask(scores, 0.25)  # 2 of 8
    assert mask.tolist() == [[False, True, False, False, False, False, True, False],
                             [True, False, False, False, True, False, False, False]]
    assert explain.top_k_mask(scores, 0.01).sum(1).tolist() == [1, 1]  # at least one pixel
    # an image's pixel counts every channel, by magnitude: channel sums of |attr| are [[3, 0], [0.5, 7]]
    attr = torch.tensor([[[[1.0, 0.0], [0.5, -3.0]], [[-2.0, 0.0], [0.0, 4.0]]]])
    assert explain.pixel_scores(attr).tolist() == [[3.0, 0.0, 0.5, 7.0]]
    top = explain.top_k_mask(explain.pixel_scores(attr), 0.5)
    assert top.tolist() == [[True, False, False, True]]
    masked = explain.apply_mask(torch.ones(1, 2, 2, 2), top)
    assert masked.tolist() == [[[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]]  # in both channels
    rand = explain.random_mask(3, 8, 0.25, seed=0)
    assert rand.sum(1).tolist() == [2, 2, 2] and torch.equal(rand, explain.random_mask(3, 8, 0.25, seed=0))


class _SignOfFirst(nn.Module):
    """Class 1 when feature 0 > 0: one logit `x0` (bce-style) or the two scores (-x0, x0)."""

    def __init__(self, binary_logit: bool):
        super().__init__()
        self.lin = nn.Linear(4, 1 if binary_logit else 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0, 0, 0]] if binary_logit else [[-1.0, 0, 0, 0], [1.0, 0, 0, 0]]))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("binary_logit", [False, True])
def test_deletion_check_on_a_model_that_reads_one_feature(binary_logit):
    """Only feature 0 matters: the top 25% (1 of 4) by |integrated gradient| is feature 0; masking it to 0 ties
    the scores (argmax: class 0), so exactly the class-1 half of the rows turns wrong."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(200, 4, generator=gen) + 0.5
    x[100:, 0] *= -1
    y = (x[:, 0] > 0).long()
    out = explain.deletion_check(_SignOfFirst(binary_logit), x, y, binary_logit=binary_logit, fraction=0.25)
    assert out["explain_deletion_top_drop"] == pytest.approx(0.5)
    assert 0.05 < out["explain_deletion_random_drop"] < 0.25  # feature 0 drawn for about 1 in 4 class-1 rows
    assert out["explain_deletion_gap"] == pytest.approx(0.5 - out["explain_deletion_random_drop"])


def test_examples_are_the_first_of_each_class_in_order():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2]).numpy()
    assert explain.pick_examples(labels, 3).tolist() == [1, 3, 2, 5, 0, 4]  # two per class
    assert explain.pick_examples(labels, 3, limit=4).tolist() == [1, 2, 0]  # one per class when two do not fit
