"""README's Benchmarks prose quotes figures; each one here is read from its result file under
tests/benchmarks/results and must appear, formatted as quoted, in a paragraph of README that names it
(the summary table is checked by test_layout). A rerun of a benchmark that moves a figure fails this test
until the prose says what the new result file does."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "tests" / "benchmarks" / "results"


def _ray_e2e(d, e, key):
    return d["summary"][str(e)][key]


# (words of the paragraph that quotes it, result file, how to read the figure, how README writes it)
FIGURES = [
    ("**Whole epochs**", "ray.json", lambda d: d["a_epoch"]["ratio_of_medians"], "**{:.3f}**"),
    ("**Whole epochs**", "ray.json", lambda d: 1e3 * d["a_epoch"]["raybloom_ray_whole_epoch_s"]["median"], "{:.1f} ms"),
    ("**Whole epochs**", "ray.json", lambda d: 1e3 * d["a_epoch"]["handwritten_ddp_whole_epoch_s"]["median"], "{:.1f} ms"),
    ("**Whole epochs**", "ray.json", lambda d: min(d["a_epoch"]["per_round_ratios"]), "{:.3f}"),
    ("**Whole epochs**", "ray.json", lambda d: max(d["a_epoch"]["per_round_ratios"]), "{:.3f}"),
    ("**Whole epochs**", "ray.json", lambda d: d["a_epoch"]["pass_ratio_of_medians"], "{:.3f}×"),
    ("**Whole epochs**", "ray.json", lambda d: 1e3 * d["b_startup"]["ray_non_training_per_epoch_s"]["median"], "{:.0f} ms on Ray"),
    ("**Whole epochs**", "ray-before-async.json", lambda d: d["a_epoch"]["ratio_of_medians"], "at {:.3f}"),
    ("**Whole epochs**", "ray-before-rank0-offload.json", lambda d: d["a_epoch"]["ratio_of_medians"], "{:.3f} in a third"),
    ("**Whole epochs**", "ray.json", lambda d: 1e3 * d["a_epoch"]["raybloom_ray_pass_s"]["median"], "({:.1f} against"),
    ("**Whole epochs**", "ray-worker-nice0.json", lambda d: d["a_epoch"]["ratio_of_medians"], "{:.3f}"),
    ("**Whole epochs**", "ray-worker-nice0.json", lambda d: d["a_epoch"]["pass_ratio_of_medians"], "{:.3f}"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 5, "raybloom_wall_s"), "{:.1f} s against"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 5, "peer_wall_s"), "against {:.1f} s"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 5, "ratio"), "**{:.2f}**"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 25, "raybloom_wall_s"), "{:.1f} s against"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 25, "peer_wall_s"), "against {:.1f} s"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 25, "ratio"), "**{:.2f}**"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 5, "peer_epoch_s"), "{:.2f} s"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 5, "ratio_to_tuned"), "{:.2f}×"),
    ("**End to end**", "ray_e2e.json", lambda d: _ray_e2e(d, 25, "ratio_to_tuned"), "{:.2f}×"),
    ("**Fixed cost**", "ray_e2e.json", lambda d: d["summary"]["fixed"]["median_s"], "{:.1f} s"),
    ("**Fixed cost**", "ray_e2e.json", lambda d: d["summary"]["fixed"]["min_s"], "{:.1f}.."),
    ("**Fixed cost**", "ray_e2e.json", lambda d: d["summary"]["fixed"]["max_s"], "..{:.1f} s"),
    ("**Scaling on paper**", "scaling_model.json", lambda d: d["models"]["cnn_digits"]["measured"]["epoch_1_s"], "from {:.3f} s"),
    ("**Scaling on paper**", "scaling_model.json",
     lambda d: d["models"]["cnn_digits"]["prediction"]["by_network"]["1 Gb/s"]["16"], "to {:.3f} s on 1 Gb/s"),
    ("**Scaling on paper**", "scaling_model.json",
     lambda d: d["models"]["cnn_digits"]["prediction"]["by_network"]["25 Gb/s"]["16"], "{:.3f} s on 25 Gb/s"),
    ("**Scaling on paper**", "scaling_model.json",
     lambda d: d["models"]["mlp 784-256-128-10"]["measured"]["epoch_1_s"]
     / d["models"]["mlp 784-256-128-10"]["prediction"]["by_network"]["1 Gb/s"]["16"], "{:.1f}× on 1 Gb/s"),
    ("**Scaling on paper**", "scaling_model.json",
     lambda d: d["models"]["mlp 784-256-128-10"]["measured"]["epoch_1_s"]
     / d["models"]["mlp 784-256-128-10"]["prediction"]["by_network"]["25 Gb/s"]["16"], "{:.1f}× on 25 Gb/s"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["raybloom_wall_s"], "took {:.1f} s end to end"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["peer_wall_s"], "app's {:.1f} s"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["ratio"], "**{:.2f}**"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["rounds_ratio"], "{:.2f}× the app's"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: ", ".join(f"{v:.2f}" for v in d["summary"]["per_pair"]),
     "(per pair {};"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["lean_wall_s"], "took {:.1f} s, **"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["lean_ratio"], "**{:.2f}** of the app"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["phases"]["raybloom"]["to_serverapp_s"],
     "start in {:.1f} s against"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["phases"]["peer"]["to_serverapp_s"],
     "the app's {:.1f} s (its own"),
    ("in-process FedAvg loop calling", "federated_peer.json",
     lambda d: d["summary"]["phases"]["raybloom"]["serverapp_to_last_round_s"], "rounds in {:.1f} s against"),
    ("in-process FedAvg loop calling", "federated_peer.json",
     lambda d: d["summary"]["phases"]["peer"]["serverapp_to_last_round_s"], "against {:.1f} s, and ends"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["phases"]["raybloom"]["after_last_round_s"],
     "ends {:.1f} s after"),
    ("in-process FedAvg loop calling", "federated_peer.json", lambda d: d["summary"]["phases"]["peer"]["after_last_round_s"],
     "the app's {:.1f} s (raybloom returns"),
    ("in-process FedAvg loop calling", "federated.json", lambda d: d["ratio_end_to_end"], "**{:.2f}** at the job's"),
    ("in-process FedAvg loop calling", "federated-local20.json", lambda d: d["ratio_end_to_end"], "**{:.2f}** at 20"),
    ("in-process FedAvg loop calling", "federated.json", lambda d: d["ratio_rounds"], "at {:.2f}"),
    ("in-process FedAvg loop calling", "federated-local20.json", lambda d: d["ratio_rounds"], "and {:.2f}"),
    ("in-process FedAvg loop calling", "federated.json", lambda d: d["ratio_rounds_after_first"], "at {:.2f}"),
    ("in-process FedAvg loop calling", "federated-local20.json", lambda d: d["ratio_rounds_after_first"], "and {:.2f}."),
    ("in-process FedAvg loop calling", "federated.json", lambda d: statistics.median(x["wall_s"] for x in d["simulation"]),
     "simulation {:.1f} s"),
    ("in-process FedAvg loop calling", "federated.json", lambda d: min(x["wall_s"] for x in d["loop"]), "loop {:.1f}–"),
    ("in-process FedAvg loop calling", "federated.json", lambda d: max(x["wall_s"] for x in d["loop"]), "–{:.1f} s"),
    ("**Search**", "search.json", lambda d: d["parallelism"]["ratio_of_medians"], "**{:.3f}**"),
    ("**Search**", "search.json", lambda d: d["parallelism"]["wall_s"]["2"]["median"], "{:.1f} s at concurrency 2"),
    ("**Search**", "search.json", lambda d: d["parallelism"]["wall_s"]["1"]["median"], "against {:.1f} s one at a time"),
    ("**Search**", "search.json", lambda d: ", ".join(f"{v:.3f}" for v in d["parallelism"]["paired_ratios"]), "(paired {})"),
    ("**Search**", "search.json", lambda d: d["parallelism"]["epoch_slowdown"], "({:.2f}×)"),
    ("**Search**", "search.json", lambda d: d["pruning"]["groups"]["tpe/successive_halving"]["pruned_share"]["median"], "pruned {:.0%}"),
    ("**Search**", "search.json", lambda d: d["pruning"]["groups"]["tpe/successive_halving"]["epoch_ratio"]["median"], "ran {:.0%}"),
    ("**Search**", "search.json", lambda d: -100 * d["pruning"]["groups"]["tpe/successive_halving"]["best_delta"]["median"],
     "{:.2f} points below"),
    ("**Search**", "search.json",
     lambda d: f"{100 * d['pruning']['groups']['tpe/successive_halving']['best_delta']['min']:.2f}".replace("-", "−"), "; {}.."),
    ("**Search**", "search.json", lambda d: 1e3 * d["parallelism"]["epoch_seconds"]["1"]["median"], "2 threads took {:.0f} ms"),
    ("**Search**", "search.json", lambda d: 1e3 * d["parallelism"]["epoch_seconds"]["2"]["median"], "1 thread {:.0f} ms"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: " → ".join(f"{s['samples_per_s']:,.0f}" for s in d["sizes"]), "({} samples/s"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["ingest_ratio"], "ran {:.1f}× what the model"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["sizes"][0]["peak_rss_mb"], "RSS rose from {:.0f} to"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["sizes"][-1]["peak_rss_mb"], "to {:.0f} MB"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: f"{d['rss_ratio']:.2f}×, **{d['verdicts']['rss']}**", "({}"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["sizes"][0]["peak_uss_mb"], "rose from {:.0f} to"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["sizes"][-1]["peak_uss_mb"], "to {:.0f} MB"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["uss_ratio"], "({:.2f}×)"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: " → ".join(f"{s['peak_shmem_mb']:.0f}" for s in d["sizes"]), "went {} MB"),
    ("Scale (`bench_scale.py`", "scale.json", lambda d: d["sizes"][-1]["dataset_gb_on_disk"], "({:.2f} GB uint8 on disk"),
    ("Scale (`bench_scale.py`", "scale-rerun.json", lambda d: f"{d['sizes'][0]['peak_rss_mb']:.0f} and {d['sizes'][-1]['peak_rss_mb']:.0f} MB, {d['rss_ratio']:.2f}×", "measured {}"),
    ("Scale (`bench_scale.py`", "scale-store.json", lambda d: " and ".join(f"{p['blocks']} blocks ({p['mb']:.0f} MB) at {s['prefetch']}" for s in d["settings"] for p in s["pinned"][:1]), "pinned {}"),
    ("Scale (`bench_scale.py`", "scale-store.json", lambda d: " against ".join(f"{s['store_median_mb']:.0f} MB" for s in d["settings"]), "a median {}"),
    ("Scale (`bench_scale.py`", "scale-store.json", lambda d: " against ".join(f"{s['peak_shmem_mb']:.0f}" for s in d["settings"]), "peaked at {} MB"),
    ("Scale (`bench_scale.py`", "scale-store.json", lambda d: " against ".join(f"{s['peak_rss_mb']:.0f}" for s in d["settings"]), "RSS at {} MB"),
]


def _fixed_cost_steps() -> list[tuple[str, str]]:
    """The fixed-cost table: each step's median as README shows it, against the result file's."""
    d = json.loads((RESULTS / "ray_e2e.json").read_text())
    runs = [r for r in d["runs"] if r["side"] == "raybloom"]
    out = []
    for label in runs[0]["steps_s"]:
        values = sorted(r["steps_s"][label] for r in runs if label in r["steps_s"])
        mid = len(values) // 2
        med = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        out.append((label, f"{med:.2f}"))
    return out


def paragraphs() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Benchmarks"):]
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", section)]


@pytest.mark.parametrize("words,name,read,fmt", FIGURES, ids=[f"{f[1]}:{f[3]}:{i}" for i, f in enumerate(FIGURES)])
def test_every_figure_the_benchmark_prose_quotes_is_its_result_files(words, name, read, fmt):
    quoted = fmt.format(read(json.loads((RESULTS / name).read_text())))
    found = [p for p in paragraphs() if words in p]
    assert found, f"no paragraph of README's Benchmarks names {words!r}"
    assert any(quoted in p for p in found), f"README's paragraph {words!r} should quote {quoted!r} (from {name})"


def test_the_fixed_cost_table_is_the_timelines():
    table = next(p for p in paragraphs() if p.startswith("| step | s | whose |"))
    for _label, med in _fixed_cost_steps():
        assert f"| {med} |" in table, f"the fixed-cost table lacks a step of {med} s (results/ray_e2e.json)"


def test_the_label_efficiency_table_is_the_one_the_study_logged():
    """README's table is the study's (results/label_efficiency.json), and each mean ± std is that of the
    per-seed accuracies the study recorded."""
    d = json.loads((RESULTS / "label_efficiency.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert d["study_run"] in (RESULTS / "label_efficiency.md").read_text()
    for n in ("20", "50", "100", "200", "all"):
        cells = []
        for arm in ("scratch", "pretrained", "frozen"):
            acc = d["accuracy"][arm][n]
            assert len(acc) == d["seeds"] >= 3
            assert d["table"][arm][n]["mean"] == pytest.approx(statistics.mean(acc), abs=1e-12)
            assert d["table"][arm][n]["std"] == pytest.approx(statistics.stdev(acc), abs=1e-12)
            cells.append(f"{statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f}")
        assert f"| {n} | " + " | ".join(cells) + " |" in readme, n


def test_the_dp_budget_figures_are_the_runs():
    """The federated section's DP row and prose quote results/fed_dp_budget.json (a run's logged dp_epsilon)."""
    d = json.loads((RESULTS / "fed_dp_budget.json").read_text())
    text = (ROOT / "README.md").read_text()
    parts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text[text.index("## Federated"):text.index("\n## Data\n")])]
    prose = next(p for p in parts if "no privacy to speak of" in p)
    last = d["dp_epsilon_by_round"][-1]
    assert d["delta"] == 1e-5
    assert f"ε = {last[1]:.1f} at δ = 1e-5 after {last[0]} rounds" in prose
    assert f"{d['dp_epsilon_by_round'][0][1]:.2f} after round 1" in prose
    row = next(line for line in text.splitlines() if line.startswith("| IID, FedAvg, central DP"))
    assert f"ε = {last[1]:.1f} at δ = 1e-5 after {last[0]} rounds" in row
    assert f"rerun with the accountant: {d['test_accuracy']:.4f}" in row
    tight = d["variants"]["tight clip"]  # the same noise per coordinate, a tighter clip: a small epsilon
    assert (tight["noise_multiplier"], tight["clipping_norm"]) == (3.0, 0.1) and tight["noise_std"] == pytest.approx(0.03)
    assert (f"noise multiplier 3.0 and clipping 0.1, spends ε = {tight['dp_epsilon_by_round'][-1][1]:.2f} after the "
            f"{tight['dp_epsilon_by_round'][-1][0]} rounds, and the model stays at chance (test accuracy "
            f"{tight['test_accuracy']:.4f})") in prose
    assert f"(0.6630, then {d['test_accuracy']:.4f})" in prose
