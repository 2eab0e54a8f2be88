"""Optuna adapter: a study whose trials are engine runs, in parallel as Ray tasks.

Why plain Optuna (ask/tell) with Ray tasks, and not Ray Tune with `OptunaSearch`: on Ray 2.55 with
Optuna 5, `OptunaSearch` never prunes by itself (only a Tune scheduler can stop trials, and it does not
see Optuna's pruners), `Tuner(trainer)` is deprecated under Ray Train V2, and Tune's MLflow callback is
refused by V2's RunConfig. With ask/tell the study driver keeps Optuna's own samplers (grid, random,
TPE) and pruners (median, successive halving, Hyperband) unchanged; each trial is a Ray task that
rebuilds its `optuna.Trial` from the shared storage and calls `report` / `should_prune` after every
epoch, so pruning works while trials run side by side. The storage (a journal file, or PostgreSQL on a
cluster) is also what makes a study resumable.

A trial is `spec.with_overrides(params)` trained by the engine; nothing here has a training loop.
`driver` is the study's driver; `study` holds its storage, sampler, pruner and parameter drawing,
`trial` what runs in each trial's Ray task.
"""
