"""memtool: measure which training samples a network memorizes, and train robust models with it."""

__version__ = "0.1.0"

from .datasets import load_dataset  # noqa: E402
from .estimator import EstimateConfig, estimate, load_influence, load_scores, load_trials  # noqa: E402

__all__ = ["EstimateConfig", "estimate", "load_dataset", "load_influence", "load_scores", "load_trials"]
