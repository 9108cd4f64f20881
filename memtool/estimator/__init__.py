"""The subsampling estimator of memorization and influence (Feldman & Zhang 2020)."""

from .config import EstimateConfig
from .run import estimate
from .store import Trials, load_trials, open_run, read_run_json
from .tables import Thresholds, compute_tables, load_influence, load_scores, read_table

__all__ = ["EstimateConfig", "Thresholds", "Trials", "compute_tables", "estimate", "load_influence", "load_scores",
           "load_trials", "open_run", "read_run_json", "read_table"]
