"""What a finished training leaves in its MLflow run: the final metrics and the early-stopping tag, the
plots (the model is run on the test split for them here, not in `tracking`), and the model itself.
Every path that finishes a training (in process, Ray, a search's trials, the federated server) records
it through these functions."""

from __future__ import annotations

import importlib
import io
import threading

import torch

from raybloom import engine, models, plots, timeline, tracking


def record_final(run: tracking.RunRecorder, result: engine.FitResult) -> None:
    """`test_*`, `best_epoch`, `stopped_epoch` (a linear regression's final `w`, `b`, `w_star`, `b_star`,
    `ls_distance`) and tag `raybloom.early_stopped`. A value the last epoch already logged at that step is not
    written twice (a final `w` that early stopping did not restore to another epoch's)."""
    step = max(result.stopped_epoch, 0)
    last = result.history[step] if step < len(result.history) else {}
    run.log_metrics({k: v for k, v in result.final.items() if last.get(k) != v}, step=step)
    run.set_tags({"raybloom.early_stopped": str(result.early_stopped).lower()})


RECORDED_TAG = "raybloom.recorded"


def record_result(run: tracking.TrackedRun, result: engine.FitResult) -> None:
    """The final metrics, the plots and (unless `tracking.log_model: false`) the model of a finished training.
    Each part once: a run resumed after the server went away in the middle of this (`--resume`) skips the
    parts its `raybloom.recorded` tag lists (plots are files: written again, they replace themselves)."""
    done = set(filter(None, run.record().tags.get(RECORDED_TAG, "").split(",")))
    parts = [("final", record_final), ("plots", record_plots), ("explain", record_explanations)]
    if run.spec.tracking.log_model:
        parts.append(("model", record_model))
    for name, record in parts:
        if name in done:
            continue
        record(run, result)
        timeline.mark(f"recorded_{name}")
        if name != "plots":
            done.add(name)
            run.set_tags({RECORDED_TAG: ",".join(sorted(done))})


def warm_up(spec) -> None:
    """Import what `record_result` will need in a daemon thread, where a process waits long before it
    records (a ServerApp during its rounds): matplotlib, torch's dynamo (imported by the model's pt2 export:
    about 1,200 modules, 1 s of the recording here) and Captum's attribution methods (the explanations)."""
    names = (["torch._dynamo"] if spec.tracking.log_model else []) + (["captum.attr"] if spec.tracking.explain else [])

    def load() -> None:
        plots.pyplot()
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:  # only a head start: the recording imports what it needs itself
                pass

    threading.Thread(target=load, name="raybloom-warm-up", daemon=True).start()


def record_explanations(run: tracking.TrackedRun, result: engine.FitResult) -> None:
    """A classifier's attributions (`tracking.explain`, on by default): `plots/saliency.png` (Captum's Saliency
    and Integrated Gradients maps of the first one or two test inputs of each class) and, with the final
    metrics, `explain_deletion_gap` and its two drops (`raybloom.explain.deletion_check`). Regression and
    reconstruction models, and a run without test rows, log nothing."""
    test = result.dataset.test
    if not (run.spec.tracking.explain and result.objective.classify and len(test)):
        return
    from raybloom import explain  # loads Captum: only the process that records a run needs it

    binary = result.objective.loss == "bce"
    picked = test.take(explain.pick_examples(test.labels(), result.objective.num_classes))
    shown = explain.explain_examples(result.model, picked.x, picked.y, binary_logit=binary)
    fig = plots.saliency_maps(shown.x, shown.saliency, shown.integrated, shown.labels, shown.predicted,
                              result.dataset.meta.get("classes"))
    run.log_image(plots.png(fig), "plots/saliency.png")
    rows = test.head(explain.DELETION_ROWS)
    run.log_metrics(explain.deletion_check(result.model, rows.x, rows.y, binary_logit=binary),
                    step=max(result.stopped_epoch, 0))


def record_plots(run: tracking.RunRecorder, result: engine.FitResult) -> None:
    """Loss and learning-rate curves; on the test split, the confusion matrix or the reconstructions."""
    if result.history:
        run.log_image(plots.png(plots.loss_curves(result.history, result.best_epoch, result.stopped_epoch)),
                      "plots/loss_curves.png")
        run.log_image(plots.png(plots.lr_curve(result.history)), "plots/learning_rate.png")
    test = result.dataset.test
    if not len(test):
        return
    if result.objective.classify:  # every test row, a batch at a time (the split may be streamed)
        pred = result.objective.predict(engine.predict(result.model, test)).numpy()
        fig, _ = plots.confusion_matrix(test.labels(), pred, result.objective.num_classes, result.dataset.meta.get("classes"))
        run.log_image(plots.png(fig), "plots/confusion_matrix.png")
    elif result.objective.reconstruct:
        first = test.head(8)
        rebuilt = engine.predict(result.model, first)
        run.log_image(plots.png(plots.reconstructions(first.x.numpy(), rebuilt.numpy())), "plots/reconstructions.png")


def record_model(run: tracking.TrackedRun, result: engine.FitResult) -> None:
    """The model in its two forms: MLflow's logged model (a pt2 export, for serving: its signature from four
    test, else training, samples and what it outputs for them), and the trainable one, `weights/state_dict.pt`
    (spec, input shape, state dict: what `model.init_from` starts a cnn from)."""
    buf = io.BytesIO()
    torch.save(models.weights_record(run.spec.model, result.dataset.shape, result.model, run.run_id), buf)
    run.log_bytes(buf.getvalue(), models.WEIGHTS_ARTIFACT)
    split = result.dataset.test if len(result.dataset.test) else result.dataset.train
    example = split.head(4)
    output = engine.predict(result.model, example)  # in eval mode, as it is served
    run.log_model(result.model, example.x.numpy(), output.numpy(), run.spec.tracking.register_as)
