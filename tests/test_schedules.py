"""Each learning-rate schedule's formula, as a pure function of the epoch."""

from __future__ import annotations

import math

import pytest

from raybloom import schedules, spec


def S(**kw):
    return spec.ScheduleSpec(**kw)


def test_constant():
    assert [schedules.lr_at(t, 0.1, S(name="constant"), 10) for t in range(3)] == [0.1, 0.1, 0.1]


def test_time_decay_is_lr0_over_1_plus_kt():
    for t in range(10):
        assert schedules.lr_at(t, 0.2, S(name="time", decay=0.5), 10) == pytest.approx(0.2 / (1 + 0.5 * t))


def test_step_decay_multiplies_by_gamma_every_s_epochs():
    lrs = [schedules.lr_at(t, 1.0, S(name="step", step_size=3, gamma=0.1), 10) for t in range(7)]
    assert lrs == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01])


def test_exponential_is_lr0_gamma_to_the_t():
    for t in range(10):
        assert schedules.lr_at(t, 0.5, S(name="exponential", gamma=0.9), 10) == pytest.approx(0.5 * 0.9**t)


def test_cosine_with_warmup():
    s = S(name="cosine", warmup_epochs=2, min_lr=0.01)
    lrs = [schedules.lr_at(t, 1.0, s, 12) for t in range(12)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # linear warm-up
    assert lrs[2] == pytest.approx(1.0)  # peak after warm-up
    assert lrs[-1] == pytest.approx(0.01)  # floor at the last epoch
    mid = 2 + (12 - 2 - 1) / 2
    assert schedules.cosine(1.0, mid, 12, 2, 0.01) == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi / 2)))
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone after warm-up


def test_plateau_reduces_after_patience_epochs_without_improvement():
    s = S(name="plateau", patience=2, factor=0.5, threshold=0.0)
    history = [1.0, 0.9, 0.95, 0.92, 0.91, 0.8, 0.85, 0.86]
    lrs = [schedules.lr_at(t, 1.0, s, 10, history) for t in range(len(history) + 1)]
    # no improvement at epochs 2 and 3 -> reduced from epoch 4; again none at 6 and 7 -> reduced from 8
    assert lrs == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25])


def test_gradient_rule_scales_lr0_by_the_fall_of_the_gradient_norm_within_bounds():
    s = S(name="gradient", min_lr=0.01, power=1.0)
    norms = [4.0, 2.0, 1.0, 0.01, 8.0]
    lrs = [schedules.lr_at(t, 0.5, s, 10, grad_history=norms) for t in range(len(norms) + 1)]
    # epoch t uses g_{t-1} / g_0: none yet (lr0), 1, 1/2, 1/4, 1/400 -> the floor 0.01, 2 -> capped at lr0
    assert lrs == pytest.approx([0.5, 0.5, 0.25, 0.125, 0.01, 0.5], rel=1e-12)
    half = S(name="gradient", power=0.5)
    assert schedules.lr_at(3, 1.0, half, 10, grad_history=[4.0, 2.0, 1.0]) == pytest.approx((1.0 / 4.0) ** 0.5)
    assert schedules.lr_at(2, 1.0, half, 10, grad_history=[0.0, 1.0]) == 1.0  # no scale from a zero first norm
    assert schedules.lr_at(2, 1.0, half, 10, grad_history=[1.0, float("nan")]) == 1.0


def test_gradient_rule_refuses_a_floor_above_the_initial_lr():
    with pytest.raises(ValueError, match="schedule.min_lr.*below optim.lr"):
        spec.JobSpec.model_validate({"optim": {"lr": 0.01}, "schedule": {"name": "gradient", "min_lr": 0.1}})
