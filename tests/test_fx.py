"""torch.fx symbolic tracing through our batch-norm layers: the traced graph computes what the
model computes (outputs, gradients, running statistics), with one call_module per layer.

Run: PYTHONPATH=src python -m pytest -q tests/test_fx.py
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx
from torch import nn

from batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNormAct2d,
    BatchRenorm2d,
    FrozenBatchNorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)
from batchnorm.nn import act as act_mod
from batchnorm.nn import frozen as frozen_mod
from batchnorm.nn import renorm as renorm_mod

# (factory, the type of the module its traced graph calls: torch's for BatchNorm*d, else the layer's)
LAYERS = {
    "bn": (lambda: BatchNorm2d(4), nn.BatchNorm2d),
    "bn_cumulative": (lambda: BatchNorm2d(4, momentum=None), nn.BatchNorm2d),
    "bn_no_stats": (lambda: BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d),
    "ghost": (lambda: GhostBatchNorm2d(4, virtual_batch_size=2), GhostBatchNorm2d),
    # warm-up 1, full limits at step 2: steps 2 and 3 use r, d != (1, 0) read from the counter
    "renorm": (
        lambda: BatchRenorm2d(4, momentum=0.3, warmup_steps=1, r_max_steps=2, d_max_steps=2, r_max=1.2, d_max=0.1),
        BatchRenorm2d,
    ),
    "frozen": (lambda: FrozenBatchNorm2d(4), FrozenBatchNorm2d),
    "act": (lambda: BatchNormAct2d(4, "elu"), BatchNormAct2d),
}


def _model(layer: nn.Module) -> nn.Module:
    """Conv -> our layer -> ReLU -> Conv, with non-trivial layer state."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if name in ("num_batches_tracked", "num_batches_skipped"):
                continue
            if name in ("running_var", "running_std", "weight"):
                t.uniform_(0.5, 2.0)
            else:
                t.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), layer, nn.ReLU(), nn.Conv2d(4, 2, 1))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, with a traced BatchNorm*d's ``<path>.torch_layer.<name>`` keys as ``<path>.<name>``."""
    return {k.replace(".torch_layer.", "."): v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_traced_graph_equals_model(kind: str, training: bool) -> None:
    make, kind_type = LAYERS[kind]
    model = _model(make()).train(training)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    # one call_module for the layer (torch's type sharing our state for BatchNorm*d), nothing else
    (call,) = [n for n in traced.graph.nodes if n.op == "call_module" and n.target in ("1", "1.torch_layer")]
    assert type(traced.get_submodule(call.target)) is kind_type
    assert not any(n.op in ("call_function", "call_method", "get_attr") for n in traced.graph.nodes)
    for step in range(3):  # several steps: running stats, counter, schedule, cumulative momentum
        x = torch.randn(6, 3, 7, 7) * 2 + 1
        x_ref = x.clone().requires_grad_(True)
        x_tr = x.clone().requires_grad_(True)
        y_ref = model(x_ref)
        y_tr = traced(x_tr)
        torch.testing.assert_close(y_tr, y_ref, rtol=0, atol=0)
        g = torch.randn_like(y_ref)
        y_ref.backward(g)
        y_tr.backward(g)
        torch.testing.assert_close(x_tr.grad, x_ref.grad, rtol=0, atol=0)
        grads_ref = {k: p.grad for k, p in model.named_parameters()}
        for k, p in traced.named_parameters():
            torch.testing.assert_close(
                p.grad, grads_ref[k.replace(".torch_layer.", ".")], rtol=0, atol=0, msg=f"{kind} step {step} grad {k}"
            )
        st_ref, st_tr = _state(model), _state(traced)
        assert st_ref.keys() == st_tr.keys()  # the graph holds the layer (or its torch_layer) itself
        for k in st_tr:
            torch.testing.assert_close(st_tr[k], st_ref[k], rtol=0, atol=0, msg=f"{kind} step {step} {k}")
    if training and kind in ("bn", "bn_cumulative", "ghost", "renorm", "act"):
        assert int(_state(traced)["1.num_batches_tracked"]) == 3  # the graph advanced the counter
        assert not torch.equal(_state(traced)["1.running_mean"], _state(_model(make()))["1.running_mean"])


def test_trace_shares_state_with_model_like_torch() -> None:
    """As with torch's layers, the GraphModule holds the model's own parameters and buffers."""
    model = _model(BatchNorm2d(4)).train()
    traced = torch.fx.symbolic_trace(model)
    before = model[1].running_mean.clone()
    traced(torch.randn(4, 3, 6, 6))
    assert not torch.equal(model[1].running_mean, before)
    assert int(model[1].num_batches_tracked) == 1


def test_trace_of_a_bare_layer_as_root() -> None:
    bn = GhostBatchNorm1d(5, virtual_batch_size=3).train()
    traced = torch.fx.symbolic_trace(copy.deepcopy(bn))
    x = torch.randn(8, 5)
    torch.testing.assert_close(traced(x), bn(x), rtol=0, atol=0)
    torch.testing.assert_close(traced.running_var, bn.running_var, rtol=0, atol=0)


def test_sync_layer_as_the_root_is_refused() -> None:
    """A bare SyncBatchNorm has no path to call and no single step function to record."""
    from batchnorm import SyncBatchNorm

    with pytest.raises(TypeError, match="trace a module that contains the layer"):
        torch.fx.symbolic_trace(SyncBatchNorm(3))
    traced = torch.fx.symbolic_trace(nn.Sequential(SyncBatchNorm(3)))
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0"]


def test_graph_still_checks_its_input() -> None:
    traced = torch.fx.symbolic_trace(nn.Sequential(BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): expected 3 channels in dim 1, got 4"):
        traced(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\): expected 2D \(N, C\) or 3D"):
        traced(torch.randn(5, 3, 2, 2))


def test_graph_refuses_nonfinite_batch_and_warns() -> None:
    model = nn.Sequential(BatchNorm1d(3)).train()
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    x = torch.randn(4, 3)
    x[0, 1] = float("nan")
    rm = traced.get_submodule("0.torch_layer").running_mean.clone()
    with pytest.warns(RuntimeWarning, match="not finite"):
        traced(x)
    torch.testing.assert_close(traced.get_submodule("0.torch_layer").running_mean, rm, rtol=0, atol=0)
    assert int(traced.get_submodule("0.torch_layer").num_batches_tracked) == 0


def test_graph_follows_the_modules_mode() -> None:
    """The graph calls the layers, so ``train()``/``eval()`` of the graph module switch them."""
    for make, _ in LAYERS.values():
        model = _model(make()).train()
        traced = torch.fx.symbolic_trace(copy.deepcopy(model))
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(traced.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_traced_graph_round_trips_through_its_python_code() -> None:
    """GraphModule code is regenerated from the graph; recompile and re-run it (eval mode)."""
    model = _model(BatchNormAct2d(4)).eval()
    traced = torch.fx.symbolic_trace(model)
    traced.recompile()
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_prepare_fx_quantization_traces_our_layers() -> None:
    """A third-party fx tool (fx graph-mode quantization) gets through our layers; its
    observers are identities, so the prepared model computes the same up to the rounding of
    the Conv+BatchNorm fold it makes (as for torch's layer: tests/test_torch_fusers.py)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU(), FrozenBatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        # torch's own deprecation notices for torch.ao.quantization, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Please use quant_min", category=UserWarning)
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(), (x,))
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bn", "ghost", "renorm", "frozen", "act"])
def test_torch_export_in_eval_mode(kind: str) -> None:
    model = _model(LAYERS[kind][0]()).eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_traced_graph_survives_deepcopy_and_pickle() -> None:
    """fx tools deep-copy GraphModules, and users save them: the wrapped functions resolve again."""
    import io
    import pickle

    model = nn.Sequential(
        nn.Linear(3, 4),
        BatchNorm1d(4),
        GhostBatchNorm1d(4, 2),
        renorm_mod.BatchRenorm1d(4),
        act_mod.BatchNormAct1d(4),
        frozen_mod.FrozenBatchNorm1d(4),
    )
    traced = torch.fx.symbolic_trace(model.train())
    buf = io.BytesIO()
    torch.save(traced, buf)
    buf.seek(0)
    copies = [copy.deepcopy(traced), pickle.loads(pickle.dumps(traced)), torch.load(buf, weights_only=False)]
    x = torch.randn(6, 3)
    expected = copy.deepcopy(traced)(x)
    for other in copies:
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
        assert int(other.get_submodule("2").num_batches_tracked) == 1  # each copy has its own state
