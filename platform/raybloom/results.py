"""What a finished training leaves in its MLflow run: the final metrics and the early-stopping tag, the
plots (the model is run on the test split for them here, not in `tracking`), and the model itself.
Every path that finishes a training (in process, Ray, a search's trials, the federated server) records
it through these functions."""

from __future__ import annotations

from raybloom import engine, plots, tracking


def record_final(run: tracking.RunRecorder, result: engine.FitResult) -> None:
    """`test_*`, `best_epoch`, `stopped_epoch` and tag `raybloom.early_stopped`."""
    run.log_metrics(result.final, step=max(result.stopped_epoch, 0))
    run.set_tags({"raybloom.early_stopped": str(result.early_stopped).lower()})


def record_result(run: tracking.TrackedRun, result: engine.FitResult) -> None:
    """The final metrics, the plots and (unless `tracking.log_model: false`) the model of a finished training."""
    record_final(run, result)
    record_plots(run, result)
    if run.spec.tracking.log_model:
        record_model(run, result)


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
    """The model with its signature, from four test (else training) samples and what it outputs for them."""
    split = result.dataset.test if len(result.dataset.test) else result.dataset.train
    example = split.head(4)
    output = engine.predict(result.model, example)  # in eval mode, as it is served
    run.log_model(result.model, example.x.numpy(), output.numpy(), run.spec.tracking.register_as)
