"""The label-efficiency study: does self-supervised pretraining with the deconvolution network help a cnn
that has few labels? One MLflow parent run ("label efficiency", experiment digits-label-efficiency) holds
the pretraining (jobs/pretrain_deconv_digits.yaml: the training images, no labels) and, for 20, 50, 100,
200 and all labelled training samples and several seeds, a cnn from scratch, one fine-tuned from the
pretrained encoder and one with that encoder frozen (jobs/finetune_cnn_digits.yaml); the parent logs the
table (label_efficiency.md) and the plot (plots/label_efficiency.png) of test accuracy against labels,
mean ± std over the seeds. The figures go to tests/benchmarks/results/label_efficiency.{json,md} too.

    .venv/bin/python tests/benchmarks/label_efficiency.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import machine, write_results  # noqa: E402
from raybloom import plots, runner, spec, tracking  # noqa: E402
from raybloom.job import prepare_job  # noqa: E402

JOBS = HERE.parents[1] / "jobs"
SIZES = (20, 50, 100, 200, None)  # None: every training sample
ARMS = {"scratch": {}, "pretrained": {"model.freeze_encoder": False}, "frozen": {"model.freeze_encoder": True}}


def train(s: spec.JobSpec, name: str) -> runner.RunSummary:
    job = prepare_job(s)  # fetches model.init_from's weights
    return runner.train_recorded(job.spec, job.dataset, nested=True, run_name=name)


def study(seeds: int) -> dict:
    finetune = spec.load(JOBS / "finetune_cnn_digits.yaml", ["experiment=digits-label-efficiency"])
    pretrain = spec.load(JOBS / "pretrain_deconv_digits.yaml", ["experiment=digits-label-efficiency"])
    acc: dict[str, dict[str, list[float]]] = {arm: {} for arm in ARMS}
    with tracking.TrackedRun(finetune, "study", run_name="label efficiency") as parent:
        encoder = train(pretrain, "pretrain deconv").run_id
        for n in SIZES:
            for seed in range(seeds):
                for arm, extra in ARMS.items():
                    init = {"model.init_from": encoder, **extra} if arm != "scratch" else {}
                    s = finetune.with_overrides({"data.train_limit": n, "seed": seed, **init})
                    got = train(s, f"{arm} n={n or 'all'} seed={seed}").metrics["test_accuracy"]
                    acc[arm].setdefault(str(n or "all"), []).append(got)
                    print(f"{arm:10s} n={n or 'all':>4} seed={seed}: test accuracy {got:.4f}", flush=True)
        table = summarize(acc)
        parent.log_metrics({f"{arm}_{n}_{k}": row[k] for arm, rows in table.items() for n, row in rows.items()
                            for k in ("mean", "std")})
        parent.log_text(markdown(table), "label_efficiency.md")
        parent.log_image(plots.png(plot(table)), "plots/label_efficiency.png")
    return {"pretrain_run": encoder, "study_run": parent.run_id, "seeds": seeds, "accuracy": acc, "table": table}


def summarize(acc: dict[str, dict[str, list[float]]]) -> dict:
    return {arm: {n: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                  for n, v in rows.items()} for arm, rows in acc.items()}


def markdown(table: dict) -> str:
    sizes = list(next(iter(table.values())))
    lines = ["| labels | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
    for n in sizes:
        lines.append(f"| {n} | " + " | ".join(f"{table[a][n]['mean']:.3f} ± {table[a][n]['std']:.3f}" for a in table) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rows in table.items():
        xs = list(range(len(rows)))
        ax.errorbar(xs, [r["mean"] for r in rows.values()], yerr=[r["std"] for r in rows.values()], marker="o",
                    capsize=3, label=arm)
    ax.set(xticks=xs, xticklabels=list(next(iter(table.values()))), xlabel="labelled training samples",
           ylabel="test accuracy", title="Label efficiency: cnn from scratch vs from the deconv encoder")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    t0 = time.time()
    result = study(args.seeds)
    result.update(machine=machine(), seconds=round(time.time() - t0, 1))
    text = (f"# Label efficiency (digits, {args.seeds} seeds; study run {result['study_run']})\n\n"
            "Test accuracy, mean ± std over the seeds.\n\n" + markdown(result["table"]))
    write_results(args.out, "label_efficiency", result, text)
    print(text)


if __name__ == "__main__":
    main()
