"""raybloom: one job spec, trained in process, data-parallel on Ray, as an Optuna search, or federated."""

__version__ = "0.1.0"
