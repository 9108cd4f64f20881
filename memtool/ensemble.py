"""K models of one architecture with stacked parameters, as one ``nn.Module``.

The architecture is a ``nn.Sequential`` of Linear, Conv2d, ReLU, MaxPool2d, Flatten and
Normalize layers (``mlp``, ``cnn``). Parameters are stacked along a leading model axis and
one forward pass serves all K models: ``forward`` takes (K, B, C, H, W), one batch per
model, and returns (K, B, classes). Linear layers are batched matmuls (``baddbmm``); conv
layers run per model (measured faster than one grouped convolution on CPUs). Plain autograd
gives all K gradients in one backward pass, and since SGD and Adam are elementwise one
optimizer over the stacked tensors is exactly K separate optimizers.
:meth:`Ensemble.forward_shared` serves a batch that every model sees (evaluation): the first
layer runs as one wide matmul / convolution.

Models with other layers (BatchNorm: its running statistics are per model) are trained one
at a time; :func:`stackable` tells which is which.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import Normalize

_STACKABLE = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, Normalize)


def layers(model: nn.Module) -> list[nn.Module]:
    """The leaf layers of nested ``nn.Sequential`` containers, in order."""
    if isinstance(model, nn.Sequential):
        return [leaf for m in model for leaf in layers(m)]
    return [model]


def stackable(model: nn.Module) -> bool:
    """Whether :class:`Ensemble` can stack copies of ``model``."""
    return all(isinstance(m, _STACKABLE) for m in layers(model))


class Ensemble(nn.Module):
    """K copies of one architecture with stacked parameters (leading axis = model)."""

    def __init__(self, models: list[nn.Module], build: Callable[[], nn.Module]):
        super().__init__()
        if not stackable(models[0]):
            raise ValueError(f"cannot stack {type(models[0]).__name__}: supported layers are "
                             f"{[t.__name__ for t in _STACKABLE]}; it is trained one model at a time")
        self.k, self.build = len(models), build
        per_model = [layers(m) for m in models]
        self.template = per_model[0]  # a plain list: the templates' own parameters are not registered
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, layer in enumerate(self.template):
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                w = torch.stack([m[i].weight.detach() for m in per_model])
                self.weights.append(w.transpose(1, 2).contiguous() if isinstance(layer, nn.Linear) else w)
                self.biases.append(torch.stack([m[i].bias.detach() for m in per_model]))

    def _params(self):
        it = iter(zip(self.weights, self.biases))
        return [next(it) if isinstance(layer, (nn.Linear, nn.Conv2d)) else None for layer in self.template]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, ...) -> (K, B, classes): model k on batch k."""
        return self._run(x, shared=False)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (K, B, classes): every model on the same batch."""
        return self._run(x, shared=True)

    def _run(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        k = self.k
        for layer, p in zip(self.template, self._params()):
            if isinstance(layer, nn.Linear):
                w, b = p
                if shared:  # one wide matmul: (B, D) @ (D, K*out)
                    x = (x @ w.permute(1, 0, 2).reshape(x.shape[-1], -1)).view(len(x), k, -1).transpose(0, 1)
                    x = x + b[:, None]
                else:
                    x = torch.baddbmm(b[:, None], x, w)
                shared = False
            elif isinstance(layer, nn.Conv2d):
                w, b = p
                kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
                if shared:  # one conv with K * out channels
                    x = F.conv2d(x, w.flatten(0, 1), b.flatten(), **kw)
                    x = x.view(len(x), k, -1, *x.shape[2:]).transpose(0, 1)
                else:
                    x = torch.stack([F.conv2d(x[j], w[j], b[j], **kw) for j in range(k)])
                shared = False
            elif isinstance(layer, nn.MaxPool2d) and not shared:
                y = layer(x.flatten(0, 1))
                x = y.view(k, -1, *y.shape[1:])
            elif isinstance(layer, nn.Flatten):
                x = x.flatten(1 if shared else 2)
            else:  # ReLU, Normalize, shared MaxPool2d: elementwise or per image
                x = layer(x)
        return x

    def member(self, j: int) -> nn.Module:
        """Model ``j`` as a plain module (a copy, in eval mode)."""
        model = self.build().to(self.weights[0].device)
        for layer, p in zip(layers(model), self._params()):
            if p is not None:
                w, b = p
                layer.weight.data.copy_(w[j].transpose(0, 1) if isinstance(layer, nn.Linear) else w[j])
                layer.bias.data.copy_(b[j])
        return model.eval()


class FuncEnsemble(nn.Module):
    """K copies of any architecture through ``torch.func``: parameters and buffers stacked
    along a leading model axis (``stack_module_state``), one ``vmap`` of ``functional_call``
    over them. BatchNorm keeps per-model running statistics (the stacked buffers are updated
    in place, slice k by model k). Same interface as :class:`Ensemble`: ``forward`` on
    (K, B, ...), ``forward_shared`` on (B, ...), ``member(k)``.

    Measured (benchmarks/README.md, stack_speed): on a CPU, a vmap stack of convolutional
    nets is slower than one model at a time, so the engine stacks them only where asked or on
    GPUs; dropout draws differ from separate models (vmap's ``randomness="different"``)."""

    def __init__(self, models: list[nn.Module], build: Callable[[], nn.Module]):
        super().__init__()
        from torch.func import stack_module_state

        self.k, self.build = len(models), build
        params, buffers = stack_module_state(models)
        self._pnames, self._bnames = list(params), list(buffers)
        self.stacked = nn.ParameterList(nn.Parameter(params[n].detach().clone()) for n in self._pnames)
        for i, n in enumerate(self._bnames):
            self.register_buffer(f"buffer_{i}", buffers[n].clone())
        self.base = [models[0].to("meta")]  # the architecture only (a list: not a registered submodule)

    def _state(self) -> tuple[dict, dict]:
        return (dict(zip(self._pnames, self.stacked)),
                {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self._bnames)})

    def _call(self, x: torch.Tensor, x_dim) -> torch.Tensor:
        from torch.func import functional_call, vmap

        base = self.base[0].train(self.training)

        def one(params, buffers, xb):
            return functional_call(base, (params, buffers), (xb,))

        return vmap(one, in_dims=(0, 0, x_dim), randomness="different")(*self._state(), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, ...) -> (K, B, classes): model k on batch k."""
        return self._call(x, 0)

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (K, B, classes): every model on the same batch."""
        return self._call(x, None)

    def member(self, j: int) -> nn.Module:
        """Model ``j`` as a plain module (a copy, in eval mode)."""
        params, buffers = self._state()
        model = self.build().to(self.stacked[0].device)
        model.load_state_dict({**{n: p[j].detach() for n, p in params.items()},
                               **{n: b[j] for n, b in buffers.items()}})
        return model.eval()
