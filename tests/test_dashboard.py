"""What users see: a small train + search + federated set of runs in one experiment of a fresh store,
`raybloom report` opened in headless Chromium, and the MLflow dashboard driven by Playwright.

Screenshots go to tests/_output/ (kept after the run for a human to look at).
"""

from __future__ import annotations

import html
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raybloom import runner, spec, tracking
from raybloom.federated.driver import run_federated
from raybloom.search.driver import run_study

from conftest import JOBS, ROOT, module_store, wait_healthy

OUT = ROOT / "tests" / "_output"
CHROMIUM = "/usr/bin/chromium"
EXPERIMENT = "story"


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """One experiment holding a centralized run, a 2-trial search and a short federated run."""
    with module_store(tmp_path_factory.mktemp("dashboard")) as s:
        common = [f"experiment={EXPERIMENT}", "tracking.log_model=false"]
        s.train = runner.train_in_process(spec.load(JOBS / "cnn_digits.yaml", [*common, "train.epochs=3"]))
        s.study = run_study(spec.load(JOBS / "search_random_cnn.yaml", [*common, "search.n_trials=2", "train.epochs=2",
                                                                           "search.pruner=none", "search.metric=val_accuracy"]))
        s.fed = run_federated(spec.load(JOBS / "fedprox_cnn_digits_dirichlet.yaml", [*common, "federated.rounds=2"]))
        OUT.mkdir(parents=True, exist_ok=True)
        yield s


def _chromium() -> str:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium (.ci/run installs it)"
    return CHROMIUM


def test_report_opens_in_headless_chromium_with_every_section_filled(story):
    from raybloom import report

    out = story.folder / "report.html"
    path, sections, run_id = report.write_report(EXPERIMENT, out)
    assert sections["runs"] == 3 and sections["comparison"] == 3  # centralized, federated, best trial
    assert sections["clients"] == 1  # the federated run's per-client accuracy
    fed = story.client.get_run(story.fed.run_id).data.metrics
    worst = min((v, int(k.rsplit("_p", 1)[1])) for k, v in fed.items() if k.startswith("client_val_accuracy_p"))
    assert sections["regularization"] >= 3 and sections["plots"] >= 4
    page = out.read_text()
    for heading in ("Runs", "Centralized vs federated vs the best search trial", "Federated: accuracy on each client",
                    "Regularization and early stopping", "Plots"):
        assert f"<h2>{heading}</h2>" in page
    assert f"{worst[0]:.4f} (client {worst[1]})" in page
    assert "fedprox 10c dirichlet0.1" in page and ("trial 0" in page or "trial 1" in page)
    train_name = story.client.get_run(story.train.run_id).info.run_name
    assert f"<figcaption>{html.escape(train_name)}: plots/saliency.png</figcaption>" in page  # attribution maps
    assert run_id == story.study.run_id  # logged on the latest parent run: the search study
    assert "report.html" in {a.path for a in story.client.list_artifacts(run_id)}
    shot = OUT / "report.png"
    shot.unlink(missing_ok=True)
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--disable-quic", f"--user-data-dir={story.folder / 'chromium'}", "--hide-scrollbars",
                           "--window-size=1300,2400", "--virtual-time-budget=5000", f"--screenshot={shot}", out.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists() and shot.stat().st_size > 50_000, proc.stderr[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard(story):
    port = _free_port()
    log = open(story.folder / "mlflow-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", story.uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, base, story.folder / "mlflow-server.log", poll=0.5)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def test_dashboard_lists_runs_and_nested_trials_and_shows_the_plots(story, dashboard):
    from playwright.sync_api import sync_playwright

    exp = story.client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    train_name = story.client.get_run(story.train.run_id).info.run_name
    study_name = story.client.get_run(story.study.run_id).info.run_name
    fed_name = story.client.get_run(story.fed.run_id).info.run_name
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        # raybloom's view (the URL `raybloom run` prints): the key metrics are the first columns
        page.goto(f"{dashboard}{tracking.dashboard_path(exp.experiment_id)}")
        for name in (train_name, study_name, fed_name):
            page.get_by_text(name, exact=True).first.wait_for(timeout=60000)
        for column in ("test_accuracy", "best_value", "server_val_accuracy"):
            page.get_by_text(column, exact=True).first.wait_for(timeout=30000)
        # nested trials group under their study: expand it and see them
        page.get_by_text(study_name, exact=True).first.wait_for(timeout=30000)
        # the [+] beside the study's name (MLflow 3.17: a button of the run-name cell renderer)
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
        page.get_by_text("trial 0", exact=True).first.wait_for(timeout=30000)
        page.screenshot(path=str(OUT / "runs_table_with_nested_trials.png"), full_page=True)
        for run_id, artifact, shot in ((story.train.run_id, "plots/loss_curves.png", "train_loss_curves.png"),
                                       (story.fed.run_id, "plots/partition_heatmap.png", "federated_partition_heatmap.png"),
                                       (story.study.run_id, "plots/search_optimization_history.png", "search_history.png")):
            page.goto(f"{dashboard}/#/experiments/{exp.experiment_id}/runs/{run_id}/artifacts/{artifact}")
            page.locator("img").first.wait_for(timeout=60000)
            page.get_by_text(artifact.rsplit("/", 1)[-1]).first.wait_for(timeout=30000)
            page.screenshot(path=str(OUT / shot), full_page=True)
        browser.close()
    for shot in ("runs_table_with_nested_trials.png", "train_loss_curves.png", "federated_partition_heatmap.png",
                 "search_history.png"):
        assert (OUT / shot).stat().st_size > 20_000, shot
