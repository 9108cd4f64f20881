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


# A small PGD-AT model (MLP, eps 0.1) on 2000 MNIST samples: about 2 s of CPU time.
MNIST_AT = dict(method="pgd-at", dataset="mnist", model="mlp", limit=2000, epochs=5, batch_size=64, lr=0.1,
                eps=0.1, pgd_steps=5, eval_samples=500, eval_steps=10)
# The same on the 8x8 digits, in about a second.
DIGITS_AT = dict(method="pgd-at", dataset="digits", model="mlp", hidden=64, epochs=4, batch_size=32, lr=0.1,
                 eps=0.1, pgd_steps=3, eval_samples=360, eval_steps=5)


@pytest.fixture(scope="session")
def mnist_at(tmp_path_factory):
    """(output directory, model) of MNIST_AT, trained once per session."""
    import memtool

    out = tmp_path_factory.mktemp("train") / "mnist-at"
    model = memtool.train(out=out, progress=False, **MNIST_AT)
    return out, model


@pytest.fixture(scope="session")
def digits_at(tmp_path_factory):
    import memtool

    out = tmp_path_factory.mktemp("train") / "digits-at"
    model = memtool.train(out=out, progress=False, **DIGITS_AT)
    return out, model
