"""Model builders shared by every experiment: an MLP and a small conv net of hidden ``Block``s,
each with a normalization option and its placement relative to the activation.

A *norm factory* is any callable ``factory(num_features) -> nn.Module`` (called once per
hidden layer); the strings ``"none"`` and ``"bn"`` (our ``batchnorm.BatchNorm1d/2d``) are
shortcuts. Placement ``"before"`` is Ioffe & Szegedy's ``act(BN(W u))``; ``"after"`` is
``BN(act(W u + b))``.

The bias of a Linear/Conv directly followed by a normalization is redundant (BN subtracts the
mean, beta subsumes the shift), so ``bias="auto"`` drops it exactly there.

Shape: ``MLP``: (N, D) -> (N, classes). ``ConvNet``: (N, D) flattened input, reshaped inside to
``input_shape`` ((C, H, W) uses Conv2d, (C, L) uses Conv1d) -> (N, classes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypedDict

import torch
from torch import nn
from typing_extensions import Unpack

__all__ = [
    "Block",
    "ConvNet",
    "MLP",
    "NormSpec",
    "Options",
    "activation",
    "blocks",
    "count_parameters",
    "init_gaussian_",
    "norm_act",
    "resolve_norm",
]

NormFactory = Callable[[int], nn.Module]
NormSpec = str | NormFactory | None
Placement = Literal["before", "after"]
BiasSpec = bool | Literal["auto"]
InitSpec = float | Literal["he"] | None

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (sigmoid, relu, tanh, identity)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def resolve_norm(norm: NormSpec, dims: int = 1) -> NormFactory | None:
    """Turn a norm spec into a factory ``(num_features) -> module``, or None for no norm.

    ``dims`` is 1 for (N, C) / (N, C, L) features and 2 for (N, C, H, W) feature maps.
    """
    if norm is None or norm == "none":
        return None
    if callable(norm):
        return norm
    from .. import BatchNorm1d, BatchNorm2d

    if norm != "bn" or dims not in (1, 2):
        raise ValueError(f"resolve_norm: expected 'none', 'bn' or a callable and dims 1 or 2, got {norm!r}, {dims!r}")
    return (BatchNorm1d, BatchNorm2d)[dims - 1]


def init_gaussian_(model: nn.Module, std: float | str, generator: torch.Generator | None = None) -> nn.Module:
    """In place: every Linear/Conv weight ~ N(0, std^2), every Linear/Conv bias = 0.

    ``std="he"`` uses std = sqrt(2 / fan_in) per layer (He et al. 2015, for ReLU nets; fan_in =
    in_features, or in_channels * kernel size). Norm layers keep gamma = 1, beta = 0.
    Returns ``model`` for chaining.
    """
    if std != "he" and not (isinstance(std, (int, float)) and std > 0):
        raise ValueError(f"init_gaussian_: expected std > 0 or 'he', got {std!r}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                sd = math.sqrt(2.0 / fan_in) if std == "he" else float(std)
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * sd)
                if module.bias is not None:
                    module.bias.zero_()
    return model


class Block(nn.Module):
    """One hidden layer: ``act(norm(W u))`` (placement before) or ``norm(act(W u + b))`` (after).
    ``layer`` is the Linear/Conv; ``norm`` is an ``nn.Identity`` when there is no normalization;
    the input of ``act`` is the "sigmoid input" of Ioffe's Fig. 1.
    """

    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module, placement: Placement) -> None:
        super().__init__()
        if placement not in ("before", "after"):
            raise ValueError(f"Block: expected placement 'before' or 'after', got {placement!r}")
        self.layer = layer
        self.norm = norm if norm is not None else nn.Identity()
        self.act = act
        self.placement = placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return norm_act(self.layer(x), self.norm, self.act, self.placement)


def norm_act(h: torch.Tensor, norm: Callable[..., torch.Tensor], act: nn.Module, placement: str) -> torch.Tensor:
    """The placement rule: ``act(norm(h))`` for "before", ``norm(act(h))`` for "after"."""
    return act(norm(h)) if placement == "before" else norm(act(h))


class Options(TypedDict, total=False):
    """The keyword options of ``MLP`` and ``ConvNet``."""

    act: str
    """Activation name (sigmoid, relu, tanh, identity); default relu."""
    norm: NormSpec
    """Norm spec (module docstring), applied on every hidden layer; default none."""
    placement: Placement
    """"before" (the default: BN feeds the activation, as Ioffe & Szegedy) or "after"."""
    bias: BiasSpec
    """"auto" (the default) drops a hidden layer's bias exactly when a norm directly follows it."""
    init_std: InitSpec
    """All weights ~ N(0, init_std^2) and biases 0 (Ioffe's "small random Gaussian"), or "he" for std
    sqrt(2 / fan_in), drawn from ``generator``; None (the default) keeps PyTorch's default init."""
    generator: torch.Generator | None


class _Net(nn.Module):
    """Hidden ``Block``s then a Linear classifier: the build, init and forward ``MLP`` and ``ConvNet``
    share; ``_layer(i, in, out, bias)`` builds hidden layer i. Input (N, D) is reshaped to
    ``input_shape``; conv feature maps are averaged over their positions before the classifier."""

    def __init__(self, input_shape: tuple[int, ...], hidden: Sequence[int], classes: int, **options: Unpack[Options]):
        if unknown := sorted(options.keys() - Options.__annotations__.keys()):
            raise TypeError(f"{type(self).__name__}: unexpected option(s) {unknown}; expected those of Options")
        factory = resolve_norm(options.get("norm"), dims=max(1, len(input_shape) - 1))
        super().__init__()
        self.input_shape = input_shape
        placement, bias = options.get("placement", "before"), options.get("bias", "auto")
        if bias == "auto":
            bias = not (factory is not None and placement == "before")
        if not isinstance(bias, bool):
            raise ValueError(f"expected bias True, False or 'auto', got {bias!r}")
        blocks = []
        width = input_shape[0]
        for i, h in enumerate(hidden):
            made = self._layer(i, width, h, bias)  # before the norm: PyTorch's default init draws from the global RNG
            norm = factory(h) if factory is not None else None
            blocks.append(Block(made, norm, activation(options.get("act", "relu")), placement))
            width = h
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, classes)
        if (init_std := options.get("init_std")) is not None:
            init_gaussian_(self, init_std, options.get("generator"))

    def _layer(self, i: int, n_in: int, n_out: int, bias: bool) -> nn.Module:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], *self.input_shape)  # (N, D), (N, C, L) or (N, C, H, W)
        for block in self.blocks:
            h = block(h)
        return self.head(h.flatten(2).mean(dim=2) if h.dim() > 2 else h)  # conv: (N, C_last), global average pool


class MLP(_Net):
    """Fully connected net: ``len(hidden)`` Blocks (widths, e.g. (100, 100, 100)) then a Linear
    classifier; ``options``: ``Options``.

    Shape: (N, in_features) -> (N, classes).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], classes: int, **options: Unpack[Options]) -> None:
        super().__init__((in_features,), hidden, classes, **options)

    def _layer(self, i: int, n_in: int, n_out: int, bias: bool) -> nn.Module:
        return nn.Linear(n_in, n_out, bias=bias)


class ConvNet(_Net):
    """Small conv net for 8x8 digits (or 28x28 MNIST, or 1-D MNIST-1D signals): blocks of 3x3 (or
    length-3) convolutions with padding 1 and ``channels`` outputs each (e.g. (16, 32, 64)), the first
    keeping the resolution, later ones with stride 2; then global average pooling and a Linear
    classifier. ``input_shape``: (C, H, W) for images, (C, L) for 1-D signals (the flat input is
    reshaped); ``options``: ``Options`` (the norm shortcuts give BatchNorm2d for images and
    BatchNorm1d for signals).

    Shape: (N, prod(input_shape)) -> (N, classes).
    """

    def __init__(self, input_shape: Sequence[int], channels: Sequence[int], classes: int, **options: Unpack[Options]):
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"ConvNet: expected input_shape (C, L) or (C, H, W), got {input_shape!r}")
        super().__init__(shape, channels, classes, **options)

    def _layer(self, i: int, n_in: int, n_out: int, bias: bool) -> nn.Module:
        conv = nn.Conv1d if len(self.input_shape) == 2 else nn.Conv2d
        return conv(n_in, n_out, kernel_size=3, stride=1 if i == 0 else 2, padding=1, bias=bias)


def blocks(model: nn.Module) -> Iterator[Block]:
    """The hidden ``Block``s of a lab model, in forward order."""
    return (module for module in model.modules() if isinstance(module, Block))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return int(sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad))
