"""memtool: measure which training samples a network memorizes, and train robust models with it."""

__version__ = "0.1.0"

from .datasets import load_dataset  # noqa: E402
from .userdata import ArrayData  # noqa: E402
from .models import create_model, list_models, register_model  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .methods import METHODS, Method, build_method, register_method  # noqa: E402
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

__all__ = ["ArrayData", "EstimateConfig", "METHODS", "Method", "Recipe", "TrainConfig", "build_method", "compare",
           "create_model", "estimate", "evaluate", "fit", "import_cscore", "import_fz", "list_models", "load_dataset",
           "load_influence", "load_model", "load_scores", "load_trials", "proxies", "register_method", "register_model",
           "scores", "train", "validate"]
