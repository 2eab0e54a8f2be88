"""Benchmark: `raybloom run` of the federated IID job against the plain Flower app a user would write instead.

The same job on the same Flower runtime: `raybloom run jobs/fedavg_cnn_digits_iid.yaml federated.rounds=R`
(10 clients, 2 local epochs a round, FedAvg, the global model evaluated on the server and on every client
each round) against `peers/flower_app` (Flower's own FedAvg strategy in its ServerApp, raybloom's client code
`local_train` / `evaluate_global` in its ClientApp, MLflow for each round), run the way Flower documents: a
SuperLink in simulation mode (`flower-superlink --simulation`, 10 simulated SuperNodes, 1 CPU a client
actor, Ray started by Flower's simulation) and `flwr run <app> <connection> --stream`. raybloom keeps its
own defaults otherwise: it also checkpoints every round, logs the model and draws the per-client heatmap.

Measured: end to end (from spawning the first process to the last one's exit: for the peer the SuperLink's
start, `flwr run` and the SuperLink's stop), and the rounds (first round's end to last round's end, from the
timelines both sides write: `round_end R`), and where each side's time goes (to the ServerApp's start,
its rounds, after them). As information, a third side: raybloom without the two parts of its final
recording the plain app does not do (explanations, the logged pt2 model). Sides take turns, repeated;
medians. Target: raybloom / peer <= 1.0 end to end. Runs where processes outside this benchmark used
more than 0.25 core are NOISY.

    .venv/bin/python tests/benchmarks/bench_federated_peer.py [--repeats 3] [--rounds 5] [--wait-quiet 600]

Writes tests/benchmarks/results/federated_peer.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import benchlib  # noqa: E402
from raybloom import timeline  # noqa: E402
from raybloom.net import free_ports, port_open  # noqa: E402

TARGET = 1.0
NOISE_CORES = 0.25
JOB = "jobs/fedavg_cnn_digits_iid.yaml"
BIN = ROOT / ".venv" / "bin"
APP = HERE / "peers" / "flower_app"


def _timing(tl: Path, t0: float) -> tuple[float | None, dict[str, float]]:
    """From a run's timeline: the rounds after the first (first round's end to last round's end), and the
    seconds from the start (`t0`, wall clock) to the ServerApp's start and from there to the last round's end."""
    marks = timeline.read(tl) if tl.exists() else []
    ends = [t for t, _p, s in marks if s.startswith("round_end")]
    start = next((t for t, _p, s in marks if s == "serverapp_started"), None)
    span = ends[-1] - ends[0] if len(ends) > 1 else None
    if start is None or not ends:
        return span, {}
    return span, {"to_serverapp_s": start - t0, "serverapp_to_last_round_s": max(ends) - start}


# raybloom with the two parts of its final recording a plain app does not do (explanations, the logged pt2
# model) turned off: information beside the real comparison, never its verdict
LEAN = ["tracking.explain=false", "tracking.log_model=false"]
SIDES = ("raybloom", "peer", "raybloom-lean")


def run_raybloom(work: Path, rounds: int, tl: Path, extra: tuple[str, ...] = ()) -> None:
    (work / "jobs").mkdir(exist_ok=True)
    (work / JOB).write_text((ROOT / JOB).read_text())
    env = {**os.environ, timeline.ENV: str(tl), "RAYBLOOM_DATA_DIR": str(work / "data")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([str(BIN / "raybloom"), "run", JOB, f"federated.rounds={rounds}", *extra], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"raybloom run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def run_peer(work: Path, rounds: int, tl: Path) -> None:
    """What a user does with a plain Flower app: a SuperLink in simulation mode, `flwr run`, then stop it."""
    port = free_ports(1)[0]
    home = work / "flwr_home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        "options.num-supernodes = 10\noptions.backend.client-resources.num-cpus = 1\n")
    env = {**os.environ, "FLWR_HOME": str(home), timeline.ENV: str(tl), "RAYBLOOM_DATA_DIR": str(work / "data"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(work / "superlink.log", "w") as log:
        link = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                                 "--disable-runtime-dependency-installation", "--database", str(work / "state.db"),
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not port_open(port):
            if link.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the SuperLink did not start: {(work / 'superlink.log').read_text()[-2000:]}")
            time.sleep(0.2)
        config = f'job="{ROOT / JOB}" num-server-rounds={rounds} tracking-uri="sqlite:///{work / "mlflow.db"}"'
        proc = subprocess.run([str(BIN / "flwr"), "run", str(APP), "sim", "--stream", "--run-config", config],
                              cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode or not tl.exists():
            raise SystemExit(f"flwr run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
            link.wait()


def measure(side: str, work: Path, rounds: int) -> dict:
    tl = work / f"timeline-{time.time_ns()}.txt"
    meter = benchlib.SampledOthersMeter().start()
    t0, epoch0 = time.perf_counter(), time.time()
    if side == "peer":
        run_peer(work, rounds, tl)
    else:
        run_raybloom(work, rounds, tl, tuple(LEAN) if side == "raybloom-lean" else ())
    wall = time.perf_counter() - t0
    noise = meter.stop()
    span, phases = _timing(tl, epoch0)
    if phases:
        phases["after_last_round_s"] = wall - phases["to_serverapp_s"] - phases["serverapp_to_last_round_s"]
    return {"side": side, "wall_s": wall, "rounds_after_first_s": span, "phases": phases, "noise": noise,
            "noisy": noise["others_cores"] > NOISE_CORES}


def report(r: dict) -> str:
    s = r["summary"]
    verdict = "NOISY" if s["noisy"] else ("PASS" if s["pass"] else "MISS")
    return "\n".join([
        "# Federated: `raybloom run` vs a plain Flower app on the same runtime", "",
        f"`raybloom run {JOB} federated.rounds={r['rounds']}` vs `flwr run tests/benchmarks/peers/flower_app` on a "
        f"simulation SuperLink (10 SuperNodes, 1 CPU a client). {r['repeats']} alternating pair(s). Machine: "
        f"{r['machine']['cpu']}, {r['machine']['cores']} cores; load average {r['load_start']} at start, {r['load_end']} at end.", "",
        "| figure | target | measured (median) | spread | verdict |", "|---|---|---:|---|---|",
        f"| raybloom ÷ plain Flower app, end to end ({s['raybloom_wall_s']:.1f} s vs {s['peer_wall_s']:.1f} s) | ≤ {TARGET} "
        f"| {s['ratio']:.2f} | per pair {', '.join(f'{v:.2f}' for v in s['per_pair'])} | {verdict} |",
        f"| rounds 2..{r['rounds']}, raybloom ÷ plain Flower app ({s['raybloom_rounds_s']:.1f} s vs {s['peer_rounds_s']:.1f} s) "
        f"| — | {s['rounds_ratio']:.2f} | | info |",
        f"| raybloom with `{' '.join(LEAN)}` ÷ plain Flower app ({s['lean_wall_s']:.1f} s vs {s['peer_wall_s']:.1f} s) "
        f"| — | {s['lean_ratio']:.2f} | | info |", "",
        "Where the time goes (medians, seconds): from the start to the ServerApp's start, from there to the last "
        "round's end, and after it (the final test, raybloom's recording, the processes' ends).", "",
        "| side | to the ServerApp | ServerApp → last round | after the last round | end to end |", "|---|---:|---:|---:|---:|",
        *[f"| {side} | {ph['to_serverapp_s']:.1f} | {ph['serverapp_to_last_round_s']:.1f} | {ph['after_last_round_s']:.1f} "
          f"| {ph['wall_s']:.1f} |" for side, ph in s["phases"].items()], "",
        f"Processes outside the benchmark used {statistics.median(x['noise']['others_cores'] for x in r['runs']):.2f} core(s) "
        "on average per run (median).", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--wait-quiet", type=float, default=0.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    quiet = benchlib.wait_quiet(args.wait_quiet) if args.wait_quiet else None
    load_start, runs = benchlib.loadavg(), []
    with tempfile.TemporaryDirectory(prefix="raybloom-bench-fedpeer-") as tmp:
        works = {side: Path(tmp, side) for side in SIDES}
        for w in works.values():
            w.mkdir()
        for i in range(args.repeats):
            for side in SIDES[i % 3:] + SIDES[:i % 3]:  # each side first in turn
                runs.append(measure(side, works[side], args.rounds))
                x = runs[-1]
                print(f"round {i} {side:13s}: {x['wall_s']:.1f} s end to end, rounds 2..N {x['rounds_after_first_s']:.1f} s, "
                      f"others {x['noise']['others_cores']:.2f} cores", flush=True)
    med = lambda side, key: statistics.median(x[key] for x in runs if x["side"] == side)  # noqa: E731
    ours, peer = [x for x in runs if x["side"] == "raybloom"], [x for x in runs if x["side"] == "peer"]
    ratio = med("raybloom", "wall_s") / med("peer", "wall_s")
    summary = {"raybloom_wall_s": med("raybloom", "wall_s"), "peer_wall_s": med("peer", "wall_s"), "ratio": ratio,
               "per_pair": [a["wall_s"] / b["wall_s"] for a, b in zip(ours, peer)],
               "raybloom_rounds_s": med("raybloom", "rounds_after_first_s"), "peer_rounds_s": med("peer", "rounds_after_first_s"),
               "pass": ratio <= TARGET, "noisy": any(x["noisy"] for x in runs)}
    summary["rounds_ratio"] = summary["raybloom_rounds_s"] / summary["peer_rounds_s"]
    summary["lean_wall_s"] = med("raybloom-lean", "wall_s")
    summary["lean_ratio"] = summary["lean_wall_s"] / summary["peer_wall_s"]
    summary["phases"] = {side: {**{k: statistics.median(x["phases"][k] for x in runs if x["side"] == side and x["phases"])
                                   for k in ("to_serverapp_s", "serverapp_to_last_round_s", "after_last_round_s")},
                                "wall_s": med(side, "wall_s")} for side in SIDES}
    result = {"when": _dt.datetime.now().isoformat(timespec="minutes"), "machine": benchlib.machine(), "rounds": args.rounds,
              "repeats": args.repeats, "load_start": load_start, "load_end": benchlib.loadavg(), "quiet_wait": quiet,
              "runs": runs, "summary": summary, "target": TARGET}
    benchlib.write_results(args.out, "federated_peer", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
