"""memtool: measure which training samples a network memorizes, and train robust models with it."""

__version__ = "0.1.0"

from .datasets import load_dataset  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .methods import METHODS, build_method  # noqa: E402
from .engine import fit  # noqa: E402
from .estimator import EstimateConfig, estimate, load_influence, load_scores, load_trials  # noqa: E402
from .estimator import compute_tables as scores  # noqa: E402  (`memtool scores RUN`)
from .checkpoints import load_model  # noqa: E402
from .training import TrainConfig, train  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .fz import import_fz  # noqa: E402
from .proxies import proxies  # noqa: E402
from .compare import compare  # noqa: E402
from .cscore import import_cscore  # noqa: E402
from .validate import validate  # noqa: E402

__all__ = ["EstimateConfig", "METHODS", "Recipe", "TrainConfig", "build_method", "compare", "estimate", "evaluate", "fit",
           "import_cscore", "import_fz", "load_dataset", "load_influence", "load_model", "load_scores", "load_trials", "proxies", "scores",
           "train", "validate"]
