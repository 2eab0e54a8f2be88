"""The GPU branch, unit-tested on CPU (no GPU here): backend, autocast, scaler and spec checks.

These tests pin the selection logic; tests/benchmarks/gpu_check.py runs the path on a real GPU (README, GPU).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from raybloom import engine, ray_train, spec
from raybloom.errors import SpecError


def test_backend_is_nccl_on_gpu_and_gloo_on_cpu():
    assert ray_train.backend_for(True) == "nccl"
    assert ray_train.backend_for(False) == "gloo"


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_on_cuda_uses_the_requested_dtype(precision, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the context object is still built
        ctx = engine.autocast_for(torch.device("cuda"), precision)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == dtype and ctx.device == "cuda"


def test_no_autocast_on_cpu_or_fp32():
    assert not isinstance(engine.autocast_for(torch.device("cpu"), "bf16"), torch.autocast)
    assert not isinstance(engine.autocast_for(torch.device("cuda"), "fp32"), torch.autocast)


def test_grad_scaler_only_for_fp16_on_gpu():
    from raybloom import data

    s = spec.JobSpec().with_overrides(["model.name=mlp"])
    ds = data.load(s.data)
    assert engine.Training(s, ds).scaler is None  # CPU fp32


@pytest.mark.parametrize("overrides, needle", [
    (["train.precision=bf16"], "train.precision: bf16 autocast runs on GPU only"),
    (["scaling.use_gpu=true"], "scaling.use_gpu: GPU training runs on Ray workers"),
])
def test_gpu_settings_that_cannot_hold_are_refused(overrides, needle):
    with pytest.raises(SpecError, match=needle):
        spec.JobSpec().with_overrides(overrides)


def test_gpu_spec_with_workers_is_valid():
    s = spec.JobSpec().with_overrides(["scaling.workers=2", "scaling.use_gpu=true", "train.precision=bf16"])
    assert s.train.precision == "bf16"
