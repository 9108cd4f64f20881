import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# A recipe that memorizes the 8x8 digits in about 3 seconds for 16 models.
DIGITS_FAST = dict(dataset="digits", model="mlp", hidden=256, epochs=40, batch_size=32, lr=0.2)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """One small finished run, shared by tests that only read it."""
    import memtool

    out = tmp_path_factory.mktemp("runs") / "digits"
    summary = memtool.estimate(out, trials=16, label_noise=0.05, progress=False, **DIGITS_FAST)
    return out, summary


@pytest.fixture
def rng():
    return np.random.default_rng(0)
