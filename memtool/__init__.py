"""memtool: measure which training samples a network memorizes, and train robust models with it."""

__version__ = "0.1.0"

from .datasets import load_dataset  # noqa: E402
from .estimator import EstimateConfig, estimate, load_influence, load_scores, load_trials  # noqa: E402
from .checkpoints import load_model  # noqa: E402
from .training import TrainConfig, train  # noqa: E402
from .evaluation import evaluate  # noqa: E402

__all__ = ["EstimateConfig", "estimate", "load_dataset", "load_influence", "load_scores", "load_trials"]
__all__ += ["TrainConfig", "evaluate", "load_model", "train"]
