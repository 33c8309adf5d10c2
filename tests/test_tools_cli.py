"""Tests for the inspect / fold / recalibrate commands (batchnorm.cli.tools).

PYTHONPATH=src python -m pytest -q tests/test_tools_cli.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm.cli as cli
from batchnorm import BatchNorm1d


@pytest.fixture(autouse=True)
def _only_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the parser from our command module alone (other helpers' modules may be absent)."""
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("batchnorm.cli.tools",))


def mlp(ours: bool = True) -> nn.Sequential:
    """The same model every call (its own seed); layer 1 is our BatchNorm1d or torch's."""
    torch.manual_seed(123)
    bn = BatchNorm1d(16) if ours else nn.BatchNorm1d(16)
    model = nn.Sequential(nn.Linear(64, 16), bn, nn.ReLU(), nn.Linear(16, 10), nn.BatchNorm1d(10))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[4].running_var.uniform_(0.5, 2)
    return model.eval()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def saved(tmp_path: Path) -> dict[str, Path]:
    return _save_models(tmp_path)


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same files, written once for the tests that only read them."""
    return _save_models(tmp_path_factory.mktemp("models"))


def _save_models(tmp_path: Path) -> dict[str, Path]:
    model = mlp()
    paths = {
        "module": tmp_path / "m.pt",
        "export": tmp_path / "m.pt2",
        "state": tmp_path / "sd.pt",
        "garbage": tmp_path / "g.pt",
    }
    torch.save(model, paths["module"])
    # torch's layers export as one aten.batch_norm call each, ours as one batchnorm.eval each
    torch.export.save(torch.export.export(mlp(ours=False), (torch.randn(8, 64),)), paths["export"])
    paths["export_ours"] = tmp_path / "ours.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(8, 64),)), paths["export_ours"])
    torch.save(model.state_dict(), paths["state"])
    paths["garbage"].write_bytes(b"not a model" * 20)
    return paths


def test_inspect_needs_trust_for_pickled_modules(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(saved["module"]))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--trust" in err and "weights_only=True" in err
    code, out, err = run(capsys, "inspect", str(saved["module"]), "--trust", "--sample", "8,64")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[2:4]]
    assert rows[0][:5] == ["1", "BatchNorm1d", "16", "0.1", "0.9"] and rows[0][-1] == "yes"
    assert rows[1][:3] == ["4", "BatchNorm1d", "10"]


@pytest.mark.parametrize(
    "key,message",
    [
        ("state", "state_dict, not a model"),
        ("garbage", "neither a torch.save file nor a torch.export"),
        (None, "no such file"),
    ],
)
def test_bad_files_are_one_line_errors(
    saved: dict[str, Path], capsys: pytest.CaptureFixture[str], key: str | None, message: str
) -> None:
    path = str(saved[key]) if key else str(saved["module"].parent / "missing.pt")
    for argv in (["inspect", path, "--trust"], ["fold", path, "-o", path + ".folded.pt", "--trust"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1


def test_bad_sample_shape(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "inspect", str(saved["export"]), "--sample", "8,abc")
    assert code == 2 and "--sample" in err


def test_fold_pickled_module(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "folded.pt"
    code, out, err = run(capsys, "fold", str(saved["module"]), "-o", str(out_path), "--trust")
    assert code == 0, err
    assert "folded 2 batch norm(s), left 0" in out
    folded = torch.load(out_path, weights_only=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = mlp()(x)
        got = folded(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def test_fold_exported_program(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "folded.pt2"
    code, out, err = run(capsys, "fold", str(saved["export"]), "-o", str(out_path))
    assert code == 0, err
    assert "folded 2 batch norm(s), left 0" in out
    program = torch.export.load(out_path)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in ops and not any("batch_norm" in op for op in ops)
    x = torch.randn(8, 64)
    with torch.no_grad():
        want = mlp(ours=False)(x)
        got = program.module()(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def digits_bn_input(model: nn.Module) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    with torch.no_grad():
        return model[0](x).double().numpy()


def test_recalibrate_digits_exact(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "recal.pt"
    code, out, err = run(
        capsys,
        "recalibrate",
        str(saved["module"]),
        "--trust",
        "--data",
        "digits",
        "-o",
        str(out_path),
        "--batch-size",
        "100",
    )
    assert code == 0, err
    assert "1797 samples" in out
    model = torch.load(out_path, weights_only=False)
    h = digits_bn_input(mlp())
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), h.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), h.var(0, ddof=1), rtol=1e-6)


def test_recalibrate_npy_pt_and_exported(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = torch.randn(30, 64) * 2 + 1
    np.save(tmp_path / "x.npy", x.numpy())
    torch.save((x, torch.zeros(30)), tmp_path / "x.pt")
    h = mlp()[0](x).detach().double().numpy()  # the same Linear weights with torch's or our BN
    for spec in ("x.npy", "x.pt"):
        out_path = tmp_path / f"r_{spec}.pt"
        code, _, err = run(
            capsys, "recalibrate", str(saved["module"]), "--trust", "--data", str(tmp_path / spec), "-o", str(out_path)
        )
        assert code == 0, err
        model = torch.load(out_path, weights_only=False)
        np.testing.assert_allclose(model[1].running_var.double().numpy(), h.var(0, ddof=1), rtol=1e-6)
    # an exported program takes batches of its example size (8): 24 of the 30 samples are used
    out_path = tmp_path / "r.pt2"
    code, out, err = run(
        capsys, "recalibrate", str(saved["export"]), "--data", str(tmp_path / "x.npy"), "-o", str(out_path)
    )
    assert code == 0, err
    assert "using the first 24 samples" in out
    program = torch.export.load(out_path)
    state = program.state_dict
    key = next(k for k in state if k.endswith("1.running_var"))
    np.testing.assert_allclose(state[key].double().numpy(), h[:24].var(0, ddof=1), rtol=1e-6)


def test_recalibrate_bad_data(saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.npy").write_bytes(b"nope")
    for spec, message in [
        ("mnist", "neither 'digits'"),
        (str(tmp_path / "bad.npy"), "not a readable .npy"),
        ("digits-images", "failed on --data"),
    ]:
        code, _, err = run(
            capsys, "recalibrate", str(saved["module"]), "--trust", "--data", spec, "-o", str(tmp_path / "o.pt")
        )
        assert code == 2 and message in err, err


def test_exported_batchnorm_of_ours_folds(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ours exports as one batchnorm.eval operator per layer, which fold lifts like aten.batch_norm."""
    out_path = tmp_path / "f.pt2"
    code, out, err = run(capsys, "fold", str(saved["export_ours"]), "-o", str(out_path))
    assert code == 0, err
    assert "folded 2 batch norm(s), left 0" in out and "note:" not in out
    folded = torch.export.load(out_path)
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any(t.startswith(("batchnorm.", "aten.batch_norm")) for t in targets), targets
    x = torch.randn(8, 64)
    torch.testing.assert_close(folded.module()(x), mlp()(x), rtol=1e-5, atol=1e-5)


def test_exported_training_batchnorm_is_reported_not_ignored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A program exported in training mode has no inference batch norm to fold: said, not ignored."""
    path = tmp_path / "train.pt2"
    with torch.no_grad():  # (a grad-mode training export does not load back in torch 2.13)
        torch.export.save(torch.export.export(mlp().train(), (torch.randn(8, 64),)), path)
    code, out, err = run(capsys, "fold", str(path), "-o", str(tmp_path / "f.pt2"))
    assert code == 2 and "exported in training mode" in err and "nothing written" in err, err
    assert not (tmp_path / "f.pt2").exists()


def test_lifted_exported_convs_fold_exactly() -> None:
    from batchnorm import fold
    from batchnorm.tools._exported import lift_modules, reexport

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, groups=1, dilation=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6),
        nn.Conv2d(6, 6, 1, groups=3), nn.BatchNorm2d(6),
    )  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
    program = torch.export.export(model, (x,))  # shares the model's tensors
    gm = program.module()
    assert lift_modules(gm) == ["0", "1", "3", "4", "5", "6"]
    assert isinstance(gm.get_submodule("3"), nn.ConvTranspose2d) and gm.get_submodule("3").groups == 2
    result = fold(gm, inplace=True)
    assert len(result.folded) == 3 and result.skipped == []
    with torch.no_grad():
        got = reexport(gm, program).module()(x)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


# ------------------------------------------------------------------ bad input: one line, exit 2


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the command; assert exit status 2, nothing on stdout, exactly one line on stderr, no traceback."""
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("batchnorm: error: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["fold", "{module}", "-o", "{tmp}/no/such/folder/f.pt", "--trust"],
            "folder '{tmp}/no/such/folder' does not exist",
        ),
        (["fold", "{module}", "-o", "{tmp}", "--trust"], "is a directory"),
        (["fold", "{module}", "-o", "{module}/sub.pt", "--trust"], "is a file, not a folder"),
        (["fold", "{module}", "-o", "{module}", "--trust"], "is the input file"),
        (["fold", "{export}", "-o", "{export}"], "is the input file"),
        (
            ["fold", "{module}", "-o", "{mdir}/../{mdirname}/m.pt", "--trust"],
            "is the input file",
        ),  # the same file, spelt otherwise
        (
            ["fold", "{module}", "-o", "{tmp}/f.onnx", "--trust"],
            "expected a .pt/.pth (torch.save) or .pt2 (torch.export)",
        ),
        (["fold", "{module}", "-o", "{tmp}/f", "--trust"], "got 'no suffix'"),
        (["fold", "{module}", "-o", "{tmp}/f.pt2", "--trust"], "a .pt2 output needs a torch.export program"),
        (["fold", "{export}", "-o", "{tmp}/f.pt"], "is a torch.export program, which is written back as .pt2"),
        (["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{tmp}/f.pt2"], "a .pt2 output needs"),
        (["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{tmp}"], "is a directory"),
        (["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{module}"], "is the input file"),
        (["recalibrate", "{module}", "--trust", "--data", "{tmp}", "-o", "{tmp}/r.pt"], "is a directory"),
        (["recalibrate", "{module}", "--trust", "--data", "{tmp}/none.npy", "-o", "{tmp}/r.pt"], "no such file"),
        (
            ["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{tmp}/r.pt", "--passes", "0"],
            "--passes: expected a positive int",
        ),
        (
            ["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{tmp}/r.pt", "--max-samples", "0"],
            "--max-samples",
        ),
        (
            ["recalibrate", "{module}", "--trust", "--data", "digits", "-o", "{tmp}/r.pt", "--batch-size", "-3"],
            "--batch-size",
        ),
        (["inspect", "{tmp}"], "is a directory, expected a file"),
        (["inspect", "{module}", "--sample", "8,y"], "--sample"),
    ],
)
def test_bad_paths_and_options_fail_before_any_work(
    saved_once: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    saved = saved_once
    mdir = saved["module"].parent

    def fill(text: str) -> str:
        return text.format(module=saved["module"], export=saved["export"], tmp=tmp_path, mdir=mdir, mdirname=mdir.name)

    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.MonkeyPatch.context() as mp:
        import batchnorm.cli.tools as tools

        # "before any work": the model is never loaded when a path or option is bad
        if argv[0] != "inspect":
            mp.setattr(tools, "_load", lambda *a: pytest.fail("the model was loaded before the paths were checked"))
        err = one_line_error(capsys, *map(fill, argv))
    assert fill(message) in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, nothing touched


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fold", "m.pt"], "the following arguments are required: -o/--output"),
        (["inspect", "m.pt", "--seed", "one"], "invalid int value: 'one'"),
        (["recalibrate", "m.pt", "-o", "r.pt", "--data", "digits", "--mode", "both"], "invalid choice: 'both'"),
    ],
)
def test_bad_options_are_one_line_too(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("batchnorm: error: ") and message in err


def test_pickle_named_pt2_is_read_by_content_without_torch_noise(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disguised = tmp_path / "pickle.pt2"
    disguised.write_bytes(saved["module"].read_bytes())
    err = one_line_error(capsys, "inspect", str(disguised))  # no --trust: refused, in one line (no torch warnings)
    assert "holds pickled Python objects (torch.nn.modules.container.Sequential)" in err and "--trust" in err
    code, out, err = run(capsys, "inspect", str(disguised), "--trust")
    assert code == 0 and err == "" and "BatchNorm1d" in out


def test_export_renamed_pt_is_recognized(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    renamed = tmp_path / "export.pt"
    renamed.write_bytes(saved["export"].read_bytes())
    code, out, err = run(capsys, "inspect", str(renamed))  # an exported program needs no --trust
    assert code == 0 and err == "" and "BatchNorm1d" in out
    code, out, err = run(capsys, "fold", str(renamed), "-o", str(tmp_path / "folded.pt2"))
    assert code == 0, err
    assert "aten.linear.default" in {str(n.target) for n in torch.export.load(tmp_path / "folded.pt2").graph.nodes}


def test_weights_only_messages_are_readable(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a tensor" * 10)
    err = one_line_error(
        capsys, "recalibrate", str(saved["module"]), "--trust", "--data", str(junk), "-o", str(tmp_path / "r.pt")
    )
    assert "not a file written by torch.save" in err
    torch.save(mlp(), tmp_path / "pickled_data.pt")
    err = one_line_error(
        capsys,
        "recalibrate",
        str(saved["module"]),
        "--trust",
        "--data",
        str(tmp_path / "pickled_data.pt"),
        "-o",
        str(tmp_path / "r.pt"),
    )
    assert "holds pickled Python objects (torch.nn.modules.container.Sequential)" in err
    for text in (err,):
        assert "\x1b" not in text and "(101)" not in text and "operand" not in text


@pytest.mark.parametrize("command", ["fold", "recalibrate"])
@pytest.mark.parametrize("fmt", ["pt", "pt2"])
def test_model_without_batchnorm_is_reported_and_nothing_written(
    command: str, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    path = tmp_path / f"plain.{fmt}"
    if fmt == "pt":
        torch.save(model, path)
    else:
        torch.export.save(torch.export.export(model, (torch.randn(8, 64),)), path)
    out = tmp_path / f"out.{fmt}"
    extra = ["--data", "digits"] if command == "recalibrate" else []
    err = one_line_error(capsys, command, str(path), "-o", str(out), "--trust", *extra)
    assert "has no batch-norm layer" in err and "nothing written" in err
    assert not out.exists()


def test_fold_with_nothing_foldable_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bn_first.pt"
    torch.save(nn.Sequential(nn.BatchNorm1d(4), nn.ReLU()).eval(), path)
    err = one_line_error(capsys, "fold", str(path), "-o", str(tmp_path / "f.pt"), "--trust")
    assert "no batch norm could be folded" in err and not (tmp_path / "f.pt").exists()


def test_missing_scikit_learn_names_the_install(
    saved: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)  # `import sklearn` now fails
    err = one_line_error(
        capsys, "recalibrate", str(saved["module"]), "--trust", "--data", "digits", "-o", str(tmp_path / "r.pt")
    )
    assert "scikit-learn" in err and "pip install '.[lab]' (in a clone of batchnorm)" in err
    assert not (tmp_path / "r.pt").exists()


def test_output_is_written_atomically_with_the_umask(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "fold", str(saved["module"]), "-o", str(tmp_path / "f.pt"), "--trust")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "f.pt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["f.pt", "m.pt", "m.pt2", "ours.pt2", "sd.pt", "g.pt"]
    )  # no temporary left


# ------------------------------------------------- output paths that only a real write can refuse


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder no one can create files in)")
@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_unwritable_output_folder_fails_before_any_work(
    saved_once: dict[str, Path], command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # /proc passes os.access for root, yet refuses new files: only a real write tells
    import batchnorm.cli.tools as tools

    monkeypatch.setattr(tools, "_load", lambda *a: pytest.fail("the model was loaded before -o was checked"))
    extra = ["--data", "digits"] if command == "recalibrate" else []
    err = one_line_error(capsys, command, str(saved_once["module"]), "-o", "/proc/out.pt", "--trust", *extra)
    assert "-o /proc/out.pt: cannot write in folder '/proc'" in err


def test_write_probe_leaves_nothing_behind(
    saved: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "fold", str(saved["module"]), "-o", str(out / "f.pt"), "--trust")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["f.pt"]


# ------------------------------------------------------- load errors name the cause and the fix


def _bn_net_class(module: str) -> type[nn.Module]:
    """A small conv + BN model class that claims to live in ``module`` (as if defined there)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    Net.__module__ = module
    Net.__qualname__ = "Net"
    return Net


def test_class_defined_in_main_script_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    path = tmp_path / "main.pt"
    net = _bn_net_class("__main__")
    with monkeypatch.context() as mp:  # the saving script's __main__ has Net; ours does not
        mp.setattr(sys.modules["__main__"], "Net", net, raising=False)
        torch.save(net().eval(), path)
    for trust in ([], ["--trust"]):  # --trust would not help, so the message is the same without it
        err = one_line_error(capsys, "inspect", str(path), *trust)
        assert "class Net was defined in the script that saved it (__main__)" in err, err
        assert "import or define Net before torch.load" in err and "state_dict" in err and ".pt2" in err


def test_class_of_a_missing_module_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys
    import types

    path = tmp_path / "other.pt"
    net = _bn_net_class("my_models_nc")
    module = types.ModuleType("my_models_nc")
    with monkeypatch.context() as mp:
        mp.setattr(module, "Net", net, raising=False)
        mp.setitem(sys.modules, "my_models_nc", module)
        torch.save(net().eval(), path)
    err = one_line_error(capsys, "inspect", str(path), "--trust")
    assert "from module 'my_models_nc', which cannot be imported here" in err and "PYTHONPATH" in err, err
    with monkeypatch.context() as mp:  # the module exists, but without the class
        mp.setitem(sys.modules, "my_models_nc", module)
        err = one_line_error(capsys, "inspect", str(path), "--trust")
    assert "class Net of module 'my_models_nc' is not found" in err, err


def test_legacy_format_is_named_and_its_resave_command_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "legacy.pt"
    torch.save(mlp(), path, _use_new_zipfile_serialization=False)
    for argv in (["inspect", str(path), "--trust"], ["fold", str(path), "-o", str(tmp_path / "f.pt"), "--trust"]):
        err = one_line_error(capsys, *argv)
        assert "legacy format" in err, err
    resave = err.split("re-save it in the current format: ")[1].strip()
    monkeypatch.chdir(tmp_path)
    exec(resave, {"torch": torch})  # the command the message gives, as written
    code, out, err = run(capsys, "inspect", "model.pt", "--trust")
    assert code == 0 and "BatchNorm1d" in out, err


@pytest.mark.parametrize(
    "content, message",
    [
        (101, "holds int 101, not a tensor"),
        ({"x": torch.zeros(3)}, "holds a dict, not a tensor"),
        (b"not torch", "not a file written by torch.save"),
    ],
)
def test_bad_data_file_says_what_it_must_contain(
    saved_once: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    content: object,
    message: str,
) -> None:
    import batchnorm.cli.tools as tools

    data = tmp_path / "data.pt"
    if isinstance(content, bytes):
        data.write_bytes(content * 20)
    else:
        torch.save(content, data)
    monkeypatch.setattr(tools, "_load", lambda *a: pytest.fail("the model was loaded before --data was read"))
    err = one_line_error(
        capsys, "recalibrate", str(saved_once["module"]), "--data", str(data), "-o", str(tmp_path / "r.pt"), "--trust"
    )
    assert message in err and "a --data .pt file must hold a tensor of inputs (N, ...)" in err, err
    assert not (tmp_path / "r.pt").exists()


def test_closed_stdout_pipe_ends_quietly(saved_once: dict[str, Path]) -> None:
    # `batchnorm inspect m.pt | head -1`: the reader leaves early; no error line, SIGPIPE's status
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[2])}
    argv = [sys.executable, "-m", "batchnorm", "inspect", str(saved_once["module"]), "--trust"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
