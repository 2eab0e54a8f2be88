"""One short check of the GPU path, for a machine with a CUDA GPU (the lent device; CI has none).

It runs the engine itself, not a copy: `engine.Training` on `cuda` in fp32, bf16 autocast and fp16 autocast
with the grad scaler (the cnn_digits job, shortened), then the DDP pieces `ray_train` uses on GPU workers:
an NCCL process group with DDP on the GPU (world 1; NCCL refuses two ranks on one GPU), and two ranks on the
same GPU over gloo with CUDA tensors, whose synchronized step must equal one process taking the union batch
(the `data.Batches` sharding contract) and whose `ray_train._agree` broadcast must reach rank 1.
Without `--ray`, Ray and MLflow are not needed (the lent GPU machine has neither; `--ray` needs them carried).

    python tests/benchmarks/gpu_check.py [--device cpu] [--epochs 12] [--ray | --only-ray] [--federated] [--out results.json]

`--ray` adds the product path, `ray_train.fit` on a Ray Train worker holding the GPU (NCCL, autocast,
rank-0 MLflow into a throwaway SQLite store), in bf16 and fp16. `--federated` adds a 2-client Flower
simulation (`flwr run` on a SuperLink the driver starts) whose client actors hold half the GPU each and
train on CUDA in bf16; every round must report both clients on the GPU.

Exit status 0 only when every check holds; the JSON holds the figures for the issue note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from raybloom import data, engine, ray_train, spec  # noqa: E402

JOB = Path(__file__).resolve().parents[2] / "jobs" / "cnn_digits.yaml"


def job(precision: str, epochs: int, on_gpu: bool, **extra) -> spec.JobSpec:
    overrides = [f"train.epochs={epochs}", f"train.precision={precision}"]
    if on_gpu:
        overrides += ["scaling.workers=1", "scaling.use_gpu=true"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return spec.load(JOB, overrides)


def train_check(precision: str, epochs: int, device: torch.device) -> dict:
    s = job(precision, epochs, device.type == "cuda")
    ds = data.load(s.data)
    tr = engine.Training(s, ds, device=device)
    xb = ds.train.x[:8].to(device)
    with engine.autocast_for(device, precision):
        out_dtype = str(tr.model(xb).dtype)
    started = time.perf_counter()
    while tr.next_epoch < epochs:
        tr.run_epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    res = tr.finish()
    return {"precision": precision, "device": str(device), "epochs": epochs, "wall_s": round(wall, 2),
            "epoch_s_median": round(statistics.median(h["epoch_seconds"] for h in tr.history[1:]), 4),
            "forward_dtype": out_dtype, "grad_scaler": tr.scaler is not None,
            "scaler_scale": float(tr.scaler.get_scale()) if tr.scaler is not None else None,
            "param_device": str(next(tr.core.parameters()).device),
            "test_accuracy": round(res.test["accuracy"], 4), "final_train_loss": round(tr.history[-1]["train_loss"], 4)}


def _exact_fp32() -> None:
    """No TF32 in the DDP comparison: it is about synchronisation, not rounding."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _ddp_job(batch_size: int) -> spec.JobSpec:
    """One fp32 SGD epoch with no randomness besides the seeded shuffle (no dropout or augmentation)."""
    return job("fp32", 1, False, **{"train.batch_size": batch_size, "regularization.dropout": 0.0,
                                    "regularization.augment.shift": 0, "optim.name": "sgd"})


def _ddp_worker(rank: int, world: int, backend: str, device_type: str, init: str, out: str) -> None:
    _exact_fp32()
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
        s = _ddp_job(16)
        ds = data.load(s.data)
        engine.seed_everything(s.seed)
        core = engine.build(s, ds).to(device)
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[0] if device_type == "cuda" else None)
        batches = data.Batches(ds.train, s.train.batch_size, seed=s.seed, rank=rank, world=world)
        tr = engine.Training(s, ds, model=model, batches=batches, device=device)
        tr.run_epoch()
        agreed = ray_train._agree(rank == 0, device)  # rank 0 says stop; every rank must hear it
        if rank == 0:
            torch.save({"state": {k: v.cpu() for k, v in core.state_dict().items()}, "agreed": agreed,
                        "backend": dist.get_backend()}, out)
        else:
            torch.save({"agreed": agreed}, out + ".1")
    finally:
        dist.destroy_process_group()


def ddp_check(backend: str, world: int, device: torch.device) -> dict:
    """DDP over `world` ranks on one device; compared with one process taking the union batches."""
    _exact_fp32()
    with tempfile.TemporaryDirectory() as d:
        out, init = os.path.join(d, "rank0.pt"), f"file://{os.path.join(d, 'rendezvous')}"
        started = time.perf_counter()
        mp.spawn(_ddp_worker, args=(world, backend, device.type, init, out), nprocs=world, join=True)
        wall = time.perf_counter() - started
        got = torch.load(out, weights_only=True)
        rank1_agreed = torch.load(out + ".1", weights_only=True)["agreed"] if world > 1 else got["agreed"]
    # the same epoch in one process: its default batches of 16 · world are the union of the ranks' shards
    s = _ddp_job(16 * world)
    ref = engine.Training(s, data.load(s.data), device=device)
    ref.run_epoch()
    diff = max(float((ref.core.state_dict()[k].cpu() - v).abs().max()) for k, v in got["state"].items())
    return {"backend": got["backend"], "world": world, "device": str(device), "wall_s": round(wall, 2),
            "max_param_diff_vs_one_process": diff, "rank0_decision_reached_every_rank": bool(got["agreed"] and rank1_agreed)}


def ray_check(precision: str, epochs: int, use_gpu: bool) -> dict:
    """The product path: `ray_train.fit` (TorchTrainer, one worker with a GPU, rank-0 MLflow), read back."""
    from mlflow.tracking import MlflowClient

    store = tempfile.mkdtemp(prefix="gpu-check-mlflow-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ.setdefault("RAYBLOOM_RAY_STORAGE", os.path.join(store, "ray_results"))
    s = job(precision, epochs, use_gpu, **{"tracking.log_model": "false", "experiment": "gpu-check"})
    if not use_gpu:
        s = s.with_overrides(["scaling.workers=1"])
    started = time.perf_counter()
    summary = ray_train.fit(s)
    wall = time.perf_counter() - started
    c = MlflowClient()
    run = c.get_run(summary.run_id)
    steps = sorted(m.step for m in c.get_metric_history(summary.run_id, "train_loss"))
    return {"path": "ray_train.fit", "precision": precision, "wall_s": round(wall, 1), "status": run.info.status,
            "device_tag": run.data.tags.get("raybloom.device"), "epochs_recorded": steps == list(range(epochs)),
            "test_accuracy": round(run.data.metrics.get("test_accuracy", float("nan")), 4)}


def federated_check(precision: str, on_gpu: bool) -> dict:
    """The federated path: `run_federated` of a 2-client, 2-round simulation, each client actor holding half
    the GPU (`federated.client_gpus=0.5`), read back: every round's clients trained on CUDA."""
    from mlflow.tracking import MlflowClient

    from raybloom.federated.driver import run_federated

    store = tempfile.mkdtemp(prefix="gpu-check-fed-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    s = spec.load(JOB.with_name("fedavg_cnn_digits_iid.yaml"),
                  ["federated.clients=2", "federated.rounds=2", "tracking.log_model=false", "experiment=gpu-check-fed",
                   f"train.precision={precision}", f"federated.client_gpus={0.5 if on_gpu else 0}"])
    started = time.perf_counter()
    summary = run_federated(s)
    wall = time.perf_counter() - started
    c = MlflowClient()
    on_gpu_by_round = [m.value for m in sorted(c.get_metric_history(summary.run_id, "clients_on_gpu"), key=lambda m: m.step)]
    return {"path": "run_federated (simulation, client_gpus=0.5)" if on_gpu else "run_federated (simulation, CPU)",
            "precision": precision, "wall_s": round(wall, 1), "status": c.get_run(summary.run_id).info.status,
            "clients_on_gpu_by_round": on_gpu_by_round, "test_accuracy": round(summary.metrics["test_accuracy"], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", default="")
    p.add_argument("--ray", action="store_true", help="also run ray_train.fit on a GPU worker (needs Ray and MLflow)")
    p.add_argument("--only-ray", action="store_true", help="only the Ray part")
    p.add_argument("--federated", action="store_true", help="also a 2-client Flower simulation, clients on CUDA "
                                                             "(needs Ray, Flower and MLflow)")
    a = p.parse_args()
    device = torch.device(a.device)
    report: dict = {"torch": torch.__version__, "python": sys.version.split()[0],
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    failures: list[str] = []
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    report["train"] = []
    if a.only_ray:
        precisions = []
    for prec in precisions:
        r = train_check(prec, a.epochs, device)
        report["train"].append(r)
        print(json.dumps(r), flush=True)
        if r["test_accuracy"] < 0.95:
            failures.append(f"{prec}: test accuracy {r['test_accuracy']} < 0.95")
        want = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[prec]
        if r["forward_dtype"] != want:
            failures.append(f"{prec}: forward ran in {r['forward_dtype']}, expected {want}")
        if r["grad_scaler"] != (prec == "fp16"):
            failures.append(f"{prec}: grad scaler {'on' if r['grad_scaler'] else 'off'}")
        if not r["param_device"].startswith(device.type):
            failures.append(f"{prec}: parameters on {r['param_device']}")
    report["ddp"] = []
    backends = [("nccl", 1), ("gloo", 2)] if device.type == "cuda" else [("gloo", 2)]
    if a.only_ray:
        backends = []
    for backend, world in backends:
        r = ddp_check(backend, world, device)
        report["ddp"].append(r)
        print(json.dumps(r), flush=True)
        if r["max_param_diff_vs_one_process"] > 1e-4:
            failures.append(f"{backend} x{world}: parameters differ from one process by {r['max_param_diff_vs_one_process']}")
        if not r["rank0_decision_reached_every_rank"]:
            failures.append(f"{backend} x{world}: rank 0's stop decision did not reach every rank")
    assert ray_train.backend_for(device.type == "cuda") == ("nccl" if device.type == "cuda" else "gloo")
    report["ray"] = []
    if a.ray or a.only_ray:
        on_gpu = device.type == "cuda"
        for prec in (["bf16", "fp16"] if on_gpu else ["fp32"]):
            try:
                r = ray_check(prec, a.epochs, on_gpu)
            except Exception as e:  # noqa: BLE001 - reported, the other checks stand
                r = {"path": "ray_train.fit", "precision": prec, "error": f"{type(e).__name__}: {e}"[:2000]}
            report["ray"].append(r)
            print(json.dumps(r), flush=True)
            want = f"{'cuda:0' if on_gpu else 'cpu'} {prec} {'nccl' if on_gpu else 'gloo'} x1"
            if r.get("status") != "FINISHED" or not r.get("epochs_recorded") or r.get("device_tag") != want \
                    or not r.get("test_accuracy", 0) >= 0.95:
                failures.append(f"ray_train.fit {prec}: {r} (expected FINISHED, every epoch, tag {want!r}, accuracy >= 0.95)")
    report["federated"] = []
    if a.federated:
        on_gpu = device.type == "cuda"
        try:
            r = federated_check("bf16" if on_gpu else "fp32", on_gpu)
        except Exception as e:  # noqa: BLE001 - reported, the other checks stand
            r = {"path": "run_federated", "error": f"{type(e).__name__}: {e}"[:2000]}
        report["federated"].append(r)
        print(json.dumps(r), flush=True)
        want = [2.0, 2.0] if on_gpu else [0.0, 0.0]
        if r.get("status") != "FINISHED" or r.get("clients_on_gpu_by_round") != want:
            failures.append(f"run_federated: {r} (expected FINISHED and clients_on_gpu {want})")
    report["failures"] = failures
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    print("FAIL: " + "; ".join(failures) if failures else "all GPU-path checks hold", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
