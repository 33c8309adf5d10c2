"""``BatchNorm1d/2d/3d``: exact drop-ins for ``torch.nn.BatchNorm*d``, computed by our kernels.

    y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias

Training normalizes with the batch's mean and *biased* variance and updates the running
statistics (``running = (1 - momentum) * running + momentum * batch``, PyTorch's convention;
``momentum=None`` gives the cumulative average 1/num_batches_tracked); ``running_var`` stores
the *unbiased* batch variance, exactly as PyTorch, so checkpoints move both ways unchanged
(same constructor arguments, parameters, buffers and ``state_dict`` keys). Evaluation uses the
running statistics, or batch statistics when ``track_running_stats=False``.

Where PyTorch misbehaves we do better:

- a batch with non-finite statistics never writes into the running statistics nor the
  counter (the NaN still reaches the output, so a loss scaler notices); the non-persistent
  buffer ``num_batches_skipped`` counts such batches, and on CPU the first one warns;
- an empty batch changes no running statistic and not ``num_batches_tracked``;
- bad input raises ``ValueError``/``TypeError`` naming the layer, what was expected and what
  arrived, at the call where torch raises and with torch's exception class (eps <= 0 in
  training: ``ValueError`` at the forward, as torch); beyond torch, momentum outside [0, 1] and
  an eps that is not a number are refused at construction.

``BatchNorm1d/2d/3d`` subclass ``torch.nn.BatchNorm1d/2d/3d`` (and so ``_BatchNorm``), so code
that looks for batch norm by type (``isinstance(m, nn.BatchNorm2d)``: fvcore's precise BN,
``swa_utils.update_bn``, timm) finds them.

The work is done by the ``torch.ops.batchnorm`` operators (`batchnorm.ops`): a training
forward is ``batchnorm::train`` then ``batchnorm::update_running_stats`` (momentum, the
``momentum=None`` factor 1/(num_batches_tracked + 1), the non-finite guard and the counters all
on the device), an evaluation forward ``batchnorm::eval``. torch.compile (fullgraph), torch.export,
torch.func and TorchScript see those nodes; nothing is read back to the host.

torch.fx: ``symbolic_trace`` enters our ``forward`` (torch's own BN layers are leaf modules of
the default tracer, ours are not). On a ``torch.fx.Proxy`` input the layer records a
``call_module`` of its `torch_layer`, an instance of torch's exact ``BatchNorm*d`` type sharing
this layer's tensors and running this layer's forward, so torch's graph tools (fusion,
quantization), which match batch norm by exact type, treat it as torch's layer; with a mask,
``channel_dim=-1`` or a parametrized weight, a ``call_module`` of the layer itself
(`batchnorm.nn._fx`). Running the graph does this layer's work, with the checks, the in-place
running-statistics update and the module's mode at that time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from .. import _checks, ops
from ..functional import channels_to_front, masked_step
from . import _torch_fusers
from ._fx import leaf_call, root_call

__all__ = [
    "BatchNormBase",
    "MaskableBatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "batch_norm_layer",
    "layer_mode",
]


def layer_mode(training: bool, track_running_stats: bool, running_mean: Tensor | None) -> tuple[bool, bool]:
    """(use_batch_stats, update) of a BatchNorm*d forward, as torch decides them.

    Training normalizes with batch statistics and, with ``track_running_stats``, updates the
    running statistics; evaluation uses the running statistics, or batch statistics when the
    layer has none.
    """
    use_batch_stats = training or running_mean is None
    return use_batch_stats, training and track_running_stats and running_mean is not None


def batch_norm_layer(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    track_running_stats: bool,
    momentum: float | None,
    eps: float,
    ndims: tuple[int, ...],
    num_features: int,
    where: str,
    num_batches_skipped: Tensor | None = None,
    channel_dim: int = 1,
    mask: Tensor | None = None,
) -> Tensor:
    """One forward of a ``BatchNorm*d`` from its state (the module's forward).

    Checks the input, then normalizes (see the module docstring) and, in training with
    ``track_running_stats``, updates ``running_mean``/``running_var``/``num_batches_tracked``
    (and ``num_batches_skipped``) in place. ``channel_dim=-1``: the channels are the input's
    last dim; ``mask`` (N, *spatial) bool: statistics over the real (True) positions only
    (`batchnorm.functional.masked_step`).

    Shape: input (N, C, *) with ``input.dim() in ndims`` -> output of the same shape;
    (N, *, C) with ``channel_dim=-1``.
    """
    if mask is not None or channel_dim != 1:
        x = channels_to_front(input, channel_dim, num_features, where)  # (N, C, *), a view
        use_batch_stats = training or running_mean is None
        if mask is None:
            y = batch_norm_layer(
                x, weight, bias, running_mean, running_var, num_batches_tracked, training, track_running_stats,
                momentum, eps, ndims, num_features, where, num_batches_skipped,
            )  # fmt: skip
        else:
            _checks.check_layer_input(x, where, ndims, num_features, use_batch_stats, eps)
            keep = not use_batch_stats or (training and track_running_stats)
            y = masked_step(
                x, mask, running_mean if keep else None, running_var if keep else None, weight, bias,
                use_batch_stats, training, momentum, eps, where, num_batches_tracked, num_batches_skipped,
            )  # fmt: skip
        return y if x is input else y.movedim(1, channel_dim)
    use_batch_stats = training or running_mean is None
    _checks.check_layer_input(input, where, ndims, num_features, use_batch_stats, eps)
    if not use_batch_stats:
        return ops.eval_forward(input, running_mean, running_var, weight, bias, eps)  # type: ignore[arg-type]
    update = training and track_running_stats and running_mean is not None
    return ops.train_step(
        input,
        weight,
        bias,
        running_mean if update else None,
        running_var if update else None,
        num_batches_tracked,  # type: ignore[arg-type]
        num_batches_skipped,  # type: ignore[arg-type]
        momentum,
        eps,
        where,
    )


class BatchNormBase(_TorchBatchNorm):
    """Shared implementation of our BatchNorm*d; subclasses set ``_ndims`` (accepted input ranks).

    Args:
        num_features: C, the number of channels (dim 1 of the input).
        eps: added to the variance inside the square root; > 0 to train.
        momentum: weight of the new batch statistic in the running average (PyTorch
            convention, default 0.1); None for the cumulative average.
        affine: learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``;
            if False, batch statistics are used in eval mode too.
        bias: with ``affine``, whether to learn the shift (PyTorch >= 2.7 argument).

    Buffers beyond torch's: ``num_batches_skipped`` (non-persistent, not in the ``state_dict``),
    the number of training batches whose statistics were not finite and were left out.
    """

    _ndims: tuple[int, ...] = (2, 3, 4, 5)
    # where the channels are: 1 (torch's convention), or -1 for BatchNorm1d on (N, L, C) input
    channel_dim = 1

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        channel_dim: int = 1,
    ) -> None:
        where = f"{type(self).__name__}({num_features})"
        if channel_dim != 1 and (channel_dim != -1 or self._ndims != (2, 3)):
            raise ValueError(
                f"{type(self).__name__}: expected channel_dim 1 (or -1, for BatchNorm1d), got {channel_dim!r}"
            )
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{type(self).__name__}: expected num_features to be a positive int, got {num_features!r}")
        _checks.check_eps_type(eps, where)
        _checks.check_momentum(momentum, where, allow_none=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if affine and not bias:
            self.register_parameter("bias", None)
        self.channel_dim = channel_dim
        skipped = torch.zeros((), dtype=torch.long, device=device) if track_running_stats else None
        self.register_buffer("num_batches_skipped", skipped, persistent=False)
        _torch_fusers.register()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _torch_fusers.register()  # an unpickled model was never built in this process

    def reset_running_stats(self) -> None:
        """Zero the running mean and counters, running variance to 1 (as torch)."""
        super().reset_running_stats()
        if getattr(self, "num_batches_skipped", None) is not None:
            self.num_batches_skipped.zero_()  # type: ignore[union-attr]

    def _where(self) -> str:
        return f"{type(self).__name__}({self.num_features})"

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        return extra if self.channel_dim == 1 else f"{extra}, channel_dim={self.channel_dim}"

    def _check_input_dim(self, input: Tensor) -> None:
        _checks.check_input(input, self._where(), ndims=self._ndims, num_features=self.num_features)

    def _skipped(self) -> Tensor | None:
        return getattr(self, "num_batches_skipped", None)

    def forward(self, input: Tensor) -> Tensor:
        """Each kind defines its own (`MaskableBatchNorm` for BatchNorm*d, ghost, BN+activation)."""
        raise NotImplementedError(f"{type(self).__name__}: subclass MaskableBatchNorm, or define forward")

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script`` compiles: this layer, whose forward's TorchScript branch is
        one call of its step registered as an operator (`batchnorm.nn._script`)."""
        from ._script import prepare

        return prepare(self)


class MaskableBatchNorm(BatchNormBase):
    """``BatchNormBase`` whose forward takes a ``mask`` and honours ``channel_dim``
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``)."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` of shape (N, C, *) per channel ((N, *, C) with ``channel_dim=-1``);
        see the module docstring. ``mask`` (N, *spatial) bool, True where a value is real:
        statistics, running statistics and gradients from the real positions only, padded
        outputs 0 (`batchnorm.functional.masked_step`)."""
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (nn/_script.py)
            return self._scripted_forward(input, mask)
        if isinstance(input, torch.fx.Proxy):  # under fx tracing: one node (nn/_fx.py)
            twin = _torch_layer_in_trace(self, input) if mask is None else None
            node = twin(input) if twin is not None else leaf_call(self, input, mask=mask)
            if node is not None:
                return node  # type: ignore[no-any-return]
        # the state read from the module's own dicts: an attribute read of a parameter or buffer
        # is a Python call (Module.__getattr__); a name moved out of them (a parametrization,
        # weight norm) is read as an attribute
        p, b = self._parameters, self._buffers
        args = (
            input,
            p["weight"] if "weight" in p else self.weight,
            p["bias"] if "bias" in p else self.bias,
            b["running_mean"] if "running_mean" in b else self.running_mean,
            b["running_var"] if "running_var" in b else self.running_var,
            b["num_batches_tracked"] if "num_batches_tracked" in b else self.num_batches_tracked,
            self.training,
            self.track_running_stats,
            self.momentum,
            self.eps,
            self._ndims,
            self.num_features,
            f"{type(self).__name__}({self.num_features})",
            b["num_batches_skipped"] if "num_batches_skipped" in b else self.num_batches_skipped,
            self.channel_dim,
            mask,
        )
        if isinstance(input, torch.fx.Proxy):  # the layer is the traced root
            return root_call(self, batch_norm_layer, args)
        return batch_norm_layer(*args)

    def _scripted_forward(self, input: Tensor, mask: Tensor | None) -> Tensor:
        """The forward under ``torch.jit.script``: one call of `batch_norm_layer` registered as an
        operator (`batchnorm.nn._script`); never called eagerly."""
        return torch.ops.batchnorm.bn_layer(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.num_batches_tracked,
            self.training, self.track_running_stats, None if self.momentum is None else float(self.momentum),
            float(self.eps), self._script_ndims, self.num_features, self._script_where, self.num_batches_skipped,
            self.channel_dim, mask,
        )  # fmt: skip

    # TorchScript compiles a module's properties unless named here
    __jit_unused_properties__ = ["torch_layer"]

    @property
    def torch_layer(self) -> _TorchBatchNorm | None:
        """This layer as an instance of torch's own ``torch.nn.BatchNorm1d/2d/3d`` (exact type),
        sharing this layer's tensors: the same ``weight``/``bias`` Parameters and running-statistics
        buffers (objects, not copies), settings and mode; its ``forward`` is this layer's.

        What a ``torch.fx`` trace records in this layer's place, so that torch's graph tools,
        which match batch norm by exact type, treat it as torch's layer. A new object on each
        read; None where no torch layer can stand for this one: a kind that is not a subclass of
        torch's ``BatchNorm1d/2d/3d`` (``SyncBatchNorm``), ``channel_dim=-1``, a parametrized
        ``weight`` or ``bias``.
        """
        p, b = self._parameters, self._buffers
        cls = next((c for c in type(self).__mro__ if c in _TORCH_KINDS), None)
        if cls is None or self.channel_dim != 1 or "weight" not in p or "bias" not in p:
            return None
        twin = cls(self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats, device="meta")
        twin._parameters.update(weight=p["weight"], bias=p["bias"])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            twin._buffers[key] = b.get(key)
        twin.register_buffer("num_batches_skipped", b.get("num_batches_skipped"), persistent=False)
        twin.train(self.training)
        twin.forward = _OurStep(twin, self._ndims, self._where())  # type: ignore[method-assign]
        return twin


_TORCH_KINDS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _OurStep:
    """The ``forward`` of a `MaskableBatchNorm.torch_layer`: our layer's step on that module's
    state (read at each call, so ``train()``/``eval()`` and moved tensors take effect).
    A class rather than a closure, so that the module pickles and deep-copies."""

    def __init__(self, module: _TorchBatchNorm, ndims: tuple[int, ...], where: str) -> None:
        self.module, self.ndims, self.where = module, ndims, where

    def __call__(self, input: Tensor) -> Tensor:
        m = self.module
        return batch_norm_layer(
            input, m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked, m.training,
            m.track_running_stats, m.momentum, m.eps, self.ndims, m.num_features, self.where,
            m.num_batches_skipped,  # type: ignore[arg-type]
        )  # fmt: skip


def _torch_layer_in_trace(layer: MaskableBatchNorm, input: torch.fx.Proxy) -> nn.Module | None:
    """``layer.torch_layer``, installed in the running fx trace under ``<layer's path>.torch_layer``
    (a leaf of the default tracer: torch.nn), or None where the trace cannot record it: a kind
    whose `torch_layer` is None, or a tracer that does not know the layer's path."""
    paths: dict[nn.Module, str] | None = getattr(input.tracer, "submodule_paths", None)
    twin = layer.torch_layer if paths and layer in paths else None
    if paths is None or twin is None:
        return None
    paths[twin] = f"{paths[layer]}.torch_layer".lstrip(".")
    return twin


class BatchNorm1d(MaskableBatchNorm, nn.BatchNorm1d):
    """Batch norm over a 2D (N, C) or 3D (N, C, L) input; drop-in for ``torch.nn.BatchNorm1d``.

    Shape: input (N, C) or (N, C, L) -> output of the same shape; statistics over N (and L).
    """

    _ndims = (2, 3)


class BatchNorm2d(MaskableBatchNorm, nn.BatchNorm2d):
    """Batch norm over a 4D (N, C, H, W) input; drop-in for ``torch.nn.BatchNorm2d``.

    Shape: input (N, C, H, W) -> same shape, dtype and memory format (channels_last kept);
    statistics per channel over N*H*W values.
    """

    _ndims = (4,)


class BatchNorm3d(MaskableBatchNorm, nn.BatchNorm3d):
    """Batch norm over a 5D (N, C, D, H, W) input; drop-in for ``torch.nn.BatchNorm3d``.

    Shape: input (N, C, D, H, W) -> same shape; statistics per channel over N*D*H*W values.
    """

    _ndims = (5,)
