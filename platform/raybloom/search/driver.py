"""The study driver: `raybloom run` of a `kind: search` spec.

It prepares the job once, opens (or resumes) the Optuna study, starts the Ray session, then keeps up to
`search.concurrency` trials running as Ray tasks (ask a point, create the trial's child run, launch; on
each finished task, tell Optuna and end the child run; a federated search's trials are federated runs
driven from threads, `federated_trial`), and finally logs the best trial on the parent
run (and retrains it on train+val when asked). It is the one writer of the parent run and the one that
ends every child run: no trial's run is left RUNNING, also when the search is interrupted.
"""

from __future__ import annotations

import math
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import optuna

from raybloom import data, plots, ray_session, tracking
from raybloom.errors import UserError
from raybloom.job import prepare_job
from raybloom.runner import RunSummary, train_recorded
from raybloom.search.study import decode, enqueue_grid, open_storage, pruner_for, sampler_for, storage_url, suggest
from raybloom.search.trial import TrialOutcome, TrialRef, run_trial, trial_spec
from raybloom.spec import JobSpec, SearchSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _recover(study: optuna.Study, spec: JobSpec) -> int:
    """Trials a dead driver left RUNNING end FAIL and are queued again (declared retries)."""
    retried = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        retried += 1
    tracking.end_stale_runs(spec, f"tags.`raybloom.study` = '{study.study_name}'")
    return retried


class Progress:
    """One line per finished trial: done / pruned / failed, best so far."""

    def __init__(self, total: int, goal: str, metric: str):
        self.total, self.goal, self.metric = total, goal, metric
        self.started = time.monotonic()

    def update(self, study: optuna.Study, number: int, state: str, value, note: str = "") -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
        try:
            best = f"best {self.metric}={study.best_value:.4g} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        shown = f"{value:.4g}" if isinstance(value, float) else "-"
        print(f"[{time.monotonic() - self.started:6.1f}s] trial {number} {state} {self.metric}={shown} {note}".rstrip()
              + f" | finished {done + pruned}/{self.total}: complete {done}, pruned {pruned}, failed {failed} | {best}",
              file=sys.stderr, flush=True)


def _n_trials(search: SearchSpec) -> int:
    return search.n_trials or (search.grid_size() if search.sampler == "grid" else 10)


@dataclass
class Study:
    """The driver's open study: Optuna's, where it is stored, and how many trials it must finish."""

    optuna: optuna.Study
    name: str
    storage: str
    n_trials: int
    retried: int


def budget(spec: JobSpec) -> int:
    """The steps a trial reports: epochs, or a federated search's rounds."""
    return spec.federated.rounds if spec.federated_search else spec.train.epochs


def open_study(spec: JobSpec) -> Study:
    """Create or load the study; trials a dead driver left RUNNING are failed and queued again."""
    search = spec.search
    name = search.study_name or f"{spec.experiment}-search"
    storage = storage_url(spec)
    study = optuna.create_study(study_name=name, storage=open_storage(storage), sampler=sampler_for(search),
                                pruner=pruner_for(search, budget(spec)), direction=search.goal, load_if_exists=True)
    study.sampler = sampler_for(search, len(study.get_trials(deepcopy=False)))
    retried = _recover(study, spec)
    if search.sampler == "grid":
        enqueue_grid(study, search)
    return Study(study, name, storage, _n_trials(search), retried)


def _trial_task(spec: JobSpec):
    """`run_trial` as a Ray task: it holds `threads_per_trial` CPUs, or none when it only drives a TorchTrainer.
    A federated search's trials are federated runs driven from threads here (each starts its own SuperLink)."""
    ray_session.init_ray(spec)  # a federated search's simulations join it too: one Ray for all its trials
    if spec.federated_search:
        from raybloom.search.federated_trial import FederatedTrials

        return FederatedTrials()
    import ray

    search = spec.search
    if search.workers_per_trial > 1:  # the TorchTrainer's workers hold the CPUs
        cpus = ray_session.cluster_cpus()
        if search.workers_per_trial * search.threads_per_trial > cpus:
            raise UserError(f"search.workers_per_trial: {search.workers_per_trial} workers × {search.threads_per_trial} "
                            f"threads_per_trial need {search.workers_per_trial * search.threads_per_trial} CPUs, the "
                            f"Ray cluster has {cpus:g}; lower them")
        ray_session.check_resources(trial_spec(spec, {}))  # GPUs too: a trial's TorchTrainer would wait forever
        return ray.remote(num_cpus=0, max_retries=0)(run_trial)
    return ray.remote(num_cpus=search.threads_per_trial, max_retries=0)(run_trial)


def run_study(spec: JobSpec) -> RunSummary:
    """Run (or resume) the study `spec.search` describes; the driver writes the parent run and ends children."""
    from raybloom import ray_train

    spec = prepare_job(spec, stream=data.SPLITS).spec  # bad data or model fail here, before any run is opened
    study = open_study(spec)
    previous = tracking.find_run(spec, f"tags.`raybloom.study` = '{study.name}' and tags.`raybloom.kind` = 'search'")
    task = _trial_task(spec)
    name = spec.tracking.run_name or f"search {study.name}"
    with tracking.TrackedRun(spec, "search", run_name=name, tags={"raybloom.study": study.name},
                             resume_run_id=previous.run_id if previous else None) as parent:
        if study.retried:
            print(f"resuming study {study.name}: {study.retried} interrupted trial(s) queued again", file=sys.stderr)
        launch = _Launcher(spec, study, parent, task, ray_train.storage_path())
        run_trials(study, launch, Progress(study.n_trials, spec.search.goal, spec.search.metric))
        summary = _log_best(study.optuna, parent, spec)
        if spec.search.retrain_best and summary.get("best_value") is not None:
            summary.update(_retrain_best(spec, study.optuna))
            parent.log_metrics({k: v for k, v in summary.items() if k.startswith("retrained_test_")})
    return RunSummary(parent.run_id, parent.experiment_id, summary)


class _Launcher:
    """Asks Optuna for the next point, creates its child run and starts its Ray task."""

    def __init__(self, spec: JobSpec, study: Study, parent: tracking.TrackedRun, task, ray_storage: str):
        self.spec, self.study, self.parent, self.task, self.ray_storage = spec, study, parent, task, ray_storage
        self.uri = tracking.tracking_uri(spec)

    def __call__(self) -> tuple[Any, optuna.Trial, tracking.RunRecorder]:
        trial = self.study.optuna.ask()
        params = suggest(trial, self.spec.search.space)
        tags = {"raybloom.study": self.study.name, "raybloom.trial": str(trial.number)}
        if "retry_of" in trial.user_attrs:
            tags["raybloom.retry_of"] = str(trial.user_attrs["retry_of"])
        child = tracking.create_child(trial_spec(self.spec, params), self.parent, f"trial {trial.number}", "trial", tags)
        ref = TrialRef(self.study.name, self.study.storage, trial.number, child.run_id, self.uri)
        return self.task.remote(self.spec.model_dump(mode="json"), params, ref, self.ray_storage), trial, child


def run_trials(study: Study, launch: _Launcher, progress: Progress) -> None:
    """Keep `search.concurrency` trials running until `n_trials` have finished (or the timeout); an
    interrupted search fails the trials still running and ends their runs KILLED."""
    search = launch.spec.search
    running: dict[Any, tuple[optuna.Trial, tracking.RunRecorder]] = {}
    deadline = time.monotonic() + search.timeout if search.timeout else math.inf
    try:
        while True:
            finished = len(study.optuna.get_trials(deepcopy=False, states=FINISHED))
            while (finished + len(running) < study.n_trials and len(running) < search.concurrency
                   and time.monotonic() < deadline):
                ref, trial, child = launch()
                running[ref] = (trial, child)
            if not running:
                break
            ready = _wait_one(list(running))
            trial, child = running.pop(ready)
            _finish(study.optuna, trial, child, _outcome(ready), progress)
    except BaseException:
        for trial, child in running.values():  # interrupted: no trial or run is left RUNNING
            study.optuna.tell(trial, state=optuna.trial.TrialState.FAIL)
            child.set_tags({"trial_state": "FAIL"})
            child.end("KILLED", "the search was interrupted")
        raise


def _wait_one(refs: list) -> Any:
    """The first of the running trials to end: Ray object refs, or a federated search's Futures."""
    if isinstance(refs[0], futures.Future):
        done, _ = futures.wait(refs, return_when=futures.FIRST_COMPLETED)
        return next(iter(done))
    import ray

    ready, _ = ray.wait(refs, num_returns=1)
    return ready[0]


def _outcome(ref) -> TrialOutcome:
    try:
        if isinstance(ref, futures.Future):
            out = ref.result()
        else:
            import ray

            out = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - a crashed trial is a FAIL, not a crashed study
        return TrialOutcome("FAIL", reason=f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")
    if out.state == "COMPLETE" and (out.value is None or not math.isfinite(out.value)):
        out.state, out.reason = "FAIL", f"non-finite objective {out.value}"
    return out


def _finish(study: optuna.Study, trial: optuna.Trial, child: tracking.RunRecorder, out: TrialOutcome,
            progress: Progress) -> None:
    """Tell Optuna how the trial ended and end its child run."""
    trial.set_user_attr("epochs", out.epochs)
    if out.reason:
        trial.set_user_attr("reason", out.reason)
    if out.state == "COMPLETE":
        study.tell(trial, out.value)
    else:
        study.tell(trial, state=optuna.trial.TrialState[out.state])
    child.log_metrics({"epochs_run": out.epochs})
    child.set_tags({"trial_state": out.state})
    if out.test:
        child.log_metrics({f"test_{k}": v for k, v in out.test.items()})
    child.end("FAILED" if out.state == "FAIL" else "FINISHED", out.reason if out.state != "COMPLETE" else None)
    progress.update(study, trial.number, out.state, out.value, f"({out.reason})" if out.reason else "")


def _log_best(study: optuna.Study, parent: tracking.TrackedRun, spec: JobSpec) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {st.name.lower(): sum(t.state == st for t in trials) for st in optuna.trial.TrialState}
    summary: dict[str, Any] = {f"trials_{k}": v for k, v in counts.items() if k in ("complete", "pruned", "fail")}
    summary["epochs_total"] = sum(int(t.user_attrs.get("epochs", 0)) for t in trials)
    try:
        best = study.best_trial
    except ValueError:
        parent.log_metrics(summary)
        parent.set_tags({"raybloom.best_trial": "none"})
        return summary
    summary["best_value"] = best.value
    parent.log_metrics(summary)
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.set_tags({"raybloom.best_trial": str(best.number)})
    _log_plots(study, parent)
    return summary


def _log_plots(study: optuna.Study, parent: tracking.TrackedRun) -> None:
    import warnings

    plots.pyplot()  # the Agg backend, before Optuna's matplotlib module imports pyplot
    from optuna.visualization import matplotlib as ovm

    figures = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len(study.best_trial.params) >= 1:
        figures["param_importances"] = lambda: ovm.plot_param_importances(study)
        figures["slice"] = lambda: ovm.plot_slice(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's "experimental" warnings
        for name, make in figures.items():
            try:
                ax = make()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances of a one-value space
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            parent.log_image(plots.png(fig), f"plots/search_{name}.png")


def _retrain_best(spec: JobSpec, study: optuna.Study) -> dict[str, Any]:
    """Train the best configuration once more on train+val, test it, and register it if asked."""
    params = {k: decode(v) for k, v in study.best_trial.params.items()}
    job = prepare_job(trial_spec(spec, params))
    dataset = job.dataset.with_train(job.dataset.train_val())
    summary = train_recorded(job.spec, dataset, nested=True, run_name=f"best of {study.study_name} (train+val)",
                             tags={"raybloom.study": study.study_name, "raybloom.retrain": "true"})
    return {f"retrained_{k}": v for k, v in summary.metrics.items() if k.startswith("test_")}
