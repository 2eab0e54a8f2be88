"""`raybloom ...`: data prepare, validate, run, ui. User errors print one line and exit 2, no traceback."""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raybloom import spec as spec_mod
from raybloom.errors import TrackingLost, TrainingDiverged, UserError, interrupt

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Train one job spec in process, on Ray, as a search, or federated; MLflow records it.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets as Parquet.")
app.add_typer(data_app, name="data")
out = Console()
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _csv(value: Optional[str], kind=str) -> Optional[list]:
    return None if value is None else [kind(v) for v in value.split(",") if v.strip()]


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(..., help="digits | linear | shapes | a path or URI: .npz, a folder of IDX files, "
                                           "a Parquet/CSV file or folder (with --features or --image, and --label), an image folder"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: under .raybloom/data)"),
    val: float = typer.Option(0.15, help="Validation fraction"),
    test: float = typer.Option(0.15, help="Test fraction (a source's own test split is kept instead)"),
    seed: int = typer.Option(0, help="Split seed"),
    samples: Optional[int] = typer.Option(None, help="Samples for synthetic sources"),
    features: Optional[str] = typer.Option(None, "--features", help="Tables: the feature columns, comma-separated (or one list column)"),
    image: Optional[str] = typer.Option(None, "--image", help="Tables: the column of encoded PNG/JPEG images"),
    label: str = typer.Option("label", "--label", help="Tables: the label column"),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Resize every image to H,W (or N for N,N)"),
    shape: Optional[str] = typer.Option(None, "--shape", help="Reshape each row's features, e.g. 1,28,28"),
    shard_mb: float = typer.Option(32.0, "--shard-mb", help="Largest Parquet file of a split, MB"),
) -> None:
    """Convert SOURCE to a prepared dataset: per split (train, val, test) a folder of Parquet shards with
    columns x and y, and dataset.json."""
    from raybloom import data

    section = {"source": source, "val_fraction": val, "test_fraction": test, "split_seed": seed, "samples": samples,
               "image_size": _csv(image_size, int), "shape": _csv(shape, int), "shard_mb": shard_mb}
    if features or image:
        cols = _csv(features)
        section["columns"] = {"features": cols[0] if cols and len(cols) == 1 else cols, "image": image, "label": label}
    try:
        data_spec = spec_mod.from_dict({"data": section}).data
        folder = data.prepare_source(data_spec, out_dir)
    except UserError as e:
        fail(str(e))
    rows = {s: data.split_rows(folder, s) for s in data.SPLITS}
    shards = {s: len(data.split_files(folder, s)) for s in data.SPLITS}
    out.print(f"prepared {source} -> {folder}  ({', '.join(f'{k} {v} rows in {shards[k]} shard(s)' for k, v in rows.items())})")


@app.command()
def validate(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: List[str] = typer.Argument(None, metavar="[KEY=VALUE]...")) -> None:
    """Check a job spec (with overrides); exit 0 when valid, 2 naming the bad field."""
    try:
        job = spec_mod.load(spec_path, overrides or [])
        if job.kind == "federated" and job.federated.dp.target_epsilon is not None:
            from raybloom.federated import privacy

            privacy.check_budget(job.federated)  # a target not even round 1 fits in, as `run` refuses it
    except UserError as e:
        fail(str(e))
    fed = job.federated
    what = (f"{fed.clients} clients, {fed.rounds} rounds × {fed.local_epochs} local epoch(s)"
            if job.kind == "federated" else f"{job.train.epochs} epochs")
    out.print(f"{spec_path}: valid ({job.kind}, model {job.model.name}, {what})")


def _number(v) -> str:
    """4 decimals; a small non-zero value (a distance to the least-squares solution) in scientific notation."""
    if not isinstance(v, float):
        return str(v)
    return f"{v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{v:.3e}"


def _summary_table(summary, job: spec_mod.JobSpec) -> Table:
    t = Table(title=f"{job.kind} · {job.model.name} · experiment {job.experiment}", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.metrics.items():
        t.add_row(k, _number(v))
    return t


DRIVER_NICE = 10  # $RAYBLOOM_DRIVER_NICE overrides it; 0 leaves the driver's priority as it is


def yield_cpu() -> None:
    """Once a simulation's SuperLink is spawned and the app's submission under way (in a thread of its own),
    this thread's work (imports, the data check, opening the run; then following the log) runs at a lower
    priority: `nice` is per thread on Linux, so the submitting thread and its `flwr run` keep theirs, and
    the threads and processes this one starts afterwards (the heatmap's, `flwr log`, `flwr ls`) inherit it.
    With the kernel's autogroup (a session is one group, as here) it orders the driver's own processes and
    threads: its `flwr run` goes first; the SuperLink's process tree is a session of its own. It cannot be
    raised back unprivileged, so only the command's own driver does it."""
    try:
        os.nice(int(os.environ.get("RAYBLOOM_DRIVER_NICE", DRIVER_NICE)))
    except (OSError, ValueError):  # a platform without it (or a value it refuses): as correct, only slower to start
        pass


def dispatch(job: spec_mod.JobSpec, resume: Optional[str] = None):
    """Run a validated spec the way it asks: in process, on Ray with N DDP workers, as a search, federated
    (`resume`: `latest` or a run id: a federated run, or a training an MLflow outage stopped, to go on in)."""
    if job.kind == "federated":
        from raybloom.federated.simulation import start_simulation
        from raybloom.tracking_uri import check_answers, tracking_uri

        check_answers(tracking_uri(job))  # an unreachable server fails now, before the SuperLink starts
        # before MLflow's and the driver's imports (torch, matplotlib): the SuperLink, the ServerApp and the
        # simulation's Ray start meanwhile
        link = start_simulation(job)
        try:
            if link is not None:
                yield_cpu()
            from raybloom import tracking

            tracking.check_reachable(tracking.tracking_uri(job))
            from raybloom.federated.driver import run_federated
        except BaseException:
            if link is not None:
                link.stop()
            raise
        return run_federated(job, resume, link=link)
    from raybloom import tracking

    tracking.check_reachable(tracking.tracking_uri(job))  # before data, Ray or a run: an unreachable server fails now
    if job.kind == "search":
        from raybloom.search.driver import run_study

        return run_study(job)
    if job.kind == "train" and job.scaling.workers >= 1:
        from raybloom import ray_train

        return ray_train.fit(job, resume)
    from raybloom import runner

    return runner.train_in_process(job, resume)


def _execute(spec_path: Path, overrides, action, extra: Optional[dict] = None):
    """Load the spec (+ overrides), run `action(spec)` with SIGTERM as Ctrl-C; user errors exit 2, one line."""
    try:
        spec = spec_mod.load(spec_path, overrides or [])
        if extra:
            spec = spec.with_overrides(extra)
        for sig in (signal.SIGINT, signal.SIGTERM):  # both end the run KILLED, never in the middle of a write
            signal.signal(sig, interrupt)
        return spec, action(spec)
    except TrainingDiverged as e:
        fail(f"{e} (run recorded as FAILED)")
    except TrackingLost as e:
        from raybloom import outbox

        again = ["raybloom", "run", str(spec_path), *(overrides or []), *(f"{k}={v}" for k, v in (extra or {}).items())]
        fail(str(e).replace(outbox.RUN_COMMAND, shlex.join(again)), TrackingLost.EXIT_CODE)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; the run is recorded as KILLED", 130)


@app.command("run")
def run_job(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: List[str] = typer.Argument(None, metavar="[KEY=VALUE]..."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else Ray in process)"),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="[RUN_ID]",
                                         help="Go on in the latest unfinished run of this spec (or RUN_ID): a federated "
                                              "run after its last finished round; a training an MLflow outage stopped "
                                              "(exit 75) from the state it kept"),
) -> None:
    """Run a job; print the MLflow run id and a summary."""
    from raybloom import timeline

    timeline.mark("cli_run")

    def action(job: spec_mod.JobSpec):
        if resume is None:
            return dispatch(job)
        if job.kind == "search" or (job.kind == "train" and job.train.cv_folds):
            raise UserError("--resume continues federated runs and trainings an MLflow outage stopped; a search "
                            "resumes by running it again (its study), cross-validation by starting it again")
        return dispatch(job, resume)

    job, summary = _execute(spec_path, overrides, action, {"scaling.address": address} if address else None)
    from raybloom import tracking

    out.print(_summary_table(summary, job))
    uri = tracking.tracking_uri(job)
    out.print(f"run id: [bold]{summary.run_id}[/]  (experiment {summary.experiment_id}, {uri})")
    if summary.children:
        out.print(f"child runs: {', '.join(summary.children)}")
    if uri.startswith("http"):
        out.print(f"browse it: open {uri}{tracking.dashboard_path(summary.experiment_id)}", highlight=False)
    else:
        out.print("browse it: [bold]raybloom ui[/] then open "
                  f"http://127.0.0.1:5000{tracking.dashboard_path(summary.experiment_id)}", highlight=False)
    timeline.mark("cli_done")


@app.command()
def compare(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: List[str] = typer.Argument(None, metavar="[KEY=VALUE]..."),
) -> None:
    """Run a federated SPEC and its centralized counterpart (same total epochs); log both and compare them."""
    from raybloom.federated.compare import run_comparison

    def compare_job(job: spec_mod.JobSpec):
        if job.kind != "federated":
            raise UserError(f"{spec_path}: compare needs a kind: federated spec, got kind: {job.kind}")
        return run_comparison(job)

    job, summary = _execute(spec_path, overrides, compare_job)
    out.print(_summary_table(summary, job))
    out.print(f"federated run id: [bold]{summary.run_id}[/]  centralized run id: [bold]{summary.children[0]}[/]")


@app.command()
def report(
    experiment: str = typer.Argument(..., metavar="EXPERIMENT"),
    out_path: Path = typer.Option(Path("report.html"), "--out", help="Where to write the HTML file"),
) -> None:
    """One self-contained HTML page comparing an experiment's runs (also logged on its latest parent run)."""
    from raybloom.report import write_report

    try:
        path, sections, run_id = write_report(experiment, out_path)
    except UserError as e:
        fail(str(e))
    out.print(f"report: {path} ({', '.join(f'{k} {v}' for k, v in sections.items())}); logged as report.html on run {run_id}")


@app.command()
def ui(
    port: int = typer.Option(5000, help="Port on 127.0.0.1"),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on"),
    uri: Optional[str] = typer.Option(None, help="Tracking store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"),
) -> None:
    """The MLflow dashboard on the configured tracking store."""
    from raybloom import tracking

    store = uri or tracking.tracking_uri()
    if store.startswith("http"):
        fail(f"the tracking store is a server ({store}): open it in a browser instead")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", host,
           "--port", str(port), "--workers", "1"]
    out.print(f"MLflow dashboard on http://{host}:{port}  (store {store}); Ctrl-C stops it")
    sys.stdout.flush()
    os.execv(sys.executable, cmd)  # the server takes this process over: signals reach it directly


from raybloom.cluster.cli import app as _cluster_app  # noqa: E402 - `cluster up|down|status`
from raybloom.submit import submit as _submit  # noqa: E402

app.add_typer(_cluster_app, name="cluster")
app.command("submit")(_submit)


RUN_ID = re.compile(r"[0-9a-f]{32}")


def resume_argv(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (the latest unfinished run) or take a run id: a bare one becomes
    `--resume=latest` (click options take a value or none, not either)."""
    out = []
    for i, arg in enumerate(argv):
        bare = arg == "--resume" and (i + 1 == len(argv) or not RUN_ID.fullmatch(argv[i + 1]))
        out.append("--resume=latest" if bare else arg)
    return out


_EXIT_CODE = [0]


def _exit_without_teardown() -> None:
    """The last exit function (the first registered, after logging's): every one registered later (Ray's
    shutdown, MLflow's flush) has run, and non-daemon threads are joined. What is left is the interpreter
    freeing every module of torch, Ray and MLflow one object at a time: 1-2 s for nothing, skipped."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(_EXIT_CODE[0])


def main() -> None:
    """The `raybloom` command."""
    sys.argv[1:] = resume_argv(sys.argv[1:])
    atexit.register(_exit_without_teardown)
    try:
        app()
    except SystemExit as e:
        _EXIT_CODE[0] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    except BaseException:
        _EXIT_CODE[0] = 1
        raise


if __name__ == "__main__":
    main()
