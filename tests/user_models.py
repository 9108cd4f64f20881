"""Factories that go wrong, as a user might write them (tests/ is on sys.path under pytest, so
``user_models:raises`` is a MODULE:FUNCTION spec). The user's good networks are
examples/mynets.py's."""

from torch import nn


def raises(in_shape, num_classes):
    raise RuntimeError("out of ideas")


def wrong_output(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(in_shape[0] * in_shape[1] * in_shape[2]), num_classes + 1))


def no_parameters(in_shape, num_classes):
    return nn.Flatten()


not_callable = 3
