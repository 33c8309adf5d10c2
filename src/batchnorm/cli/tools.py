"""Command-line inference tools: ``inspect``, ``fold``, ``recalibrate`` (thin; see ``batchnorm.cli``).

    batchnorm inspect MODEL [--sample SHAPE] [--trust]
    batchnorm fold MODEL -o OUT [--trust]
    batchnorm recalibrate MODEL --data SPEC -o OUT [--batch-size N] [--max-samples N]
                          [--mode eval|train] [--passes P] [--trust]

MODEL is a file written by ``torch.save(model)`` (a whole pickled module) or by
``torch.export.save`` (``.pt2``); which one is read from the file's content, not its name.
Loading a pickled module runs code named in the file, so it is only done with ``--trust``:
``torch.load(weights_only=True)`` is tried first and a file that needs more is refused with a
message saying so. Exported programs load without ``--trust``.
OUT's suffix names its format, which must be MODEL's: ``.pt``/``.pth`` for a pickled module,
``.pt2`` for an exported program (re-exported with its own example inputs). OUT is never
MODEL itself, and is written atomically (a temporary file, then a rename).

Every path and option is checked before any work starts; a bad one, and a model without batch
norm (nothing to fold or recalibrate), is one line on stderr, exit status 2, nothing written.

Data SPEC for ``recalibrate`` (inputs only; targets are not needed):
  ``digits``          scikit-learn's handwritten digits, (1797, 64) float32 in [0, 1]
  ``digits-images``   the same as (1797, 1, 8, 8) images
  ``PATH.npy``        a NumPy array of inputs (N, ...), loaded without pickle
  ``PATH.pt``         a tensor of inputs (N, ...), or a tuple/list whose first item is one,
                      loaded with ``weights_only=True``
The inputs are cast to the model's dtype and cut into batches along dim 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._files import atomic_path
from ._util import CliError, check_input_file, check_new_file, probe_write, require

_PICKLE_SUFFIXES = (".pt", ".pth")

# torch.save's legacy (non-zip) format opens with a pickled magic number (torch.serialization.MAGIC_NUMBER):
# PROTO n, LONG1 of 10 bytes, then the number in little-endian order
_DATA_PT = "a --data .pt file must hold a tensor of inputs (N, ...), as torch.save(x, 'inputs.pt') writes, or an (inputs, targets) pair"
_DATA_NPY = "a --data .npy file must hold a numeric array of inputs (N, ...), as np.save('inputs.npy', x) writes"

_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

__all__ = ["register"]


@dataclass
class _Loaded:
    """A model from disk and what is needed to write it back in the same format."""

    model: Any
    """The nn.Module (for a .pt2: the program's module with BN/conv/linear lifted to modules)."""
    program: Any = None
    """The ExportedProgram, for .pt2 files."""
    notes: list[str] = field(default_factory=list)
    """Warnings to print (batch norms of an exported program that could not be lifted)."""

    def print_notes(self) -> None:
        for note in self.notes:
            print(f"note: {note}")


def _format_of(path: Path) -> str:
    """ "export" (a torch.export archive), "pickle" (a torch.save archive), "legacy" (torch.save's
    pre-1.6 format) or "" (none of these), from the file's content, never its suffix."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        try:
            with open(path, "rb") as f:
                head = f.read(2 + len(_LEGACY_MAGIC))
        except OSError:
            return ""
        return "legacy" if head[:1] == b"\x80" and head[2:] == _LEGACY_MAGIC else ""
    if any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return "export"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return "pickle"
    return ""


def _unknown_format(path: str, fmt: str) -> CliError:
    """The error for a MODEL file that is neither a torch.save zip archive nor a .pt2 program."""
    if fmt == "legacy":
        return CliError(
            f"{path}: a torch.save file in the legacy format (PyTorch < 1.6, or _use_new_zipfile_serialization=False), "
            f"which this command does not read; re-save it in the current format: "
            f"torch.save(torch.load({path!r}, weights_only=False), 'model.pt')"
        )
    return CliError(f"{path}: neither a torch.save file nor a torch.export .pt2 program (not a zip archive of either)")


def _class_hint(module: str, name: str | None) -> str:
    """What to do when unpickling needs class ``name`` of ``module`` (None: any) and cannot find it."""
    pt2 = "or save a torch.export .pt2 (torch.export.save), which loads without your code"
    if module == "__main__" or module.endswith(".__main__"):
        return (
            f"the model's class {name} was defined in the script that saved it (__main__), and the file holds only "
            f"its name; move {name} into a module that is importable here (its folder on PYTHONPATH), import it "
            f"from there and save again, {pt2} (in Python: import or define {name} before torch.load, or save and "
            "load model.state_dict())"
        )
    what = f"class {name} of module {module!r}" if name else f"classes come from module {module!r}, which"
    verb = "is not found" if name else "cannot be imported here"
    return (
        f"the model's {what} {verb}; run where that module is importable (its folder on PYTHONPATH) "
        f"and is the code that saved the file, {pt2}"
    )


def _unpickle_hint(err: BaseException) -> str | None:
    """The cause and the fix when unpickling failed because a class of the model is not importable."""
    text = str(err)
    found = re.search(r"Can't get attribute '([\w.]+)' on <module '([\w.]+)'", text)
    if found:
        return _class_hint(found.group(2), found.group(1))
    if isinstance(err, ModuleNotFoundError) and err.name:
        return _class_hint(err.name, None)
    return None


def _output_format(out: str) -> str:
    """The format that ``-o``'s suffix asks for; CliError for another suffix."""
    suffix = Path(out).suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        return "pickle"
    if suffix == ".pt2":
        return "export"
    raise CliError(
        f"-o {out}: expected a .pt/.pth (torch.save) or .pt2 (torch.export) file name, got {suffix or 'no suffix'!r}"
    )


def _check_paths(model: str, out: str) -> str:
    """Check MODEL and ``-o OUT`` before any work; returns MODEL's format."""
    path = check_input_file(model)
    fmt = _format_of(path)
    if fmt not in ("export", "pickle"):
        raise _unknown_format(model, fmt)
    target = check_new_file(out, "-o", not_same_as=model, probe=False)
    want = _output_format(out)
    if want != fmt:
        if fmt == "export":
            raise CliError(
                f"-o {out}: {model} is a torch.export program, which is written back as .pt2; name the output *.pt2"
            )
        raise CliError(
            f"-o {out}: a .pt2 output needs a torch.export program, but {model} is a pickled module; "
            "name the output *.pt, or torch.export the model first"
        )
    probe_write(target.parent, f"-o {out}: cannot write in folder {str(target.parent)!r}")
    return fmt


def _weights_only_reason(err: BaseException) -> str:
    """torch.load(weights_only=True)'s refusal in a few plain words (no ANSI codes, no opcodes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"holds pickled Python objects ({found.group(1)})"
    if "Unsupported operand" in text or "invalid load key" in text or isinstance(err, EOFError):
        return "not a file written by torch.save"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip() if found else _first_line(text)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's warnings and log lines while loading (our one line says what went wrong)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load(path: str, trust: bool) -> _Loaded:
    import torch
    from torch import nn

    p = check_input_file(path)
    fmt = _format_of(p)
    if fmt == "export":
        from ..tools._exported import lift_modules, unlifted_batchnorms

        try:
            with _quiet_torch():
                program = torch.export.load(str(p))
        except Exception as err:
            raise CliError(
                f"{path}: not a readable torch.export program ({type(err).__name__}: {_first_line(err)})"
            ) from None
        module = program.module()
        lift_modules(module)
        loaded = _Loaded(module, program)
        for name in unlifted_batchnorms(module):
            loaded.notes.append(
                f"{name}: a batch norm exported in training mode or as primitive ops (not one inference "
                "aten.batch_norm / batchnorm.eval call); it is left untouched - export in eval mode, or apply "
                "the tool to the nn.Module before exporting"
            )
        return loaded
    if fmt != "pickle":
        raise _unknown_format(path, fmt)
    try:
        with _quiet_torch():
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        in_main = re.search(r"GLOBAL (__main__)\.(\w+)", str(err))
        if in_main:  # --trust would not help: the class is not in this process
            raise CliError(f"{path}: {_class_hint(in_main.group(1), in_main.group(2))}") from None
        if not trust:
            raise CliError(
                f"{path}: {_weights_only_reason(err)}, which torch.load(weights_only=True) refuses: loading it "
                "runs code named in the file. Pass --trust if you trust its source"
            ) from None
        try:
            with _quiet_torch():
                obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as err2:
            hint = _unpickle_hint(err2)
            if hint:
                raise CliError(f"{path}: {hint}") from None
            raise CliError(f"{path}: cannot load ({type(err2).__name__}: {_first_line(err2)})") from None
    if not isinstance(obj, nn.Module):
        what = "a state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CliError(
            f"{path}: holds {what}, not a model; save the whole module with torch.save(model) or use torch.export"
        )
    return _Loaded(obj)


def _save(loaded: _Loaded, out: str) -> None:
    """Write the model to ``out`` in its own format, atomically (a temporary file in the same folder,
    then a rename; the file's mode follows the umask)."""
    import torch

    try:
        with atomic_path(out) as tmp:
            if loaded.program is not None:
                from ..tools._exported import reexport

                torch.export.save(reexport(loaded.model, loaded.program), str(tmp))
            else:
                torch.save(loaded.model, str(tmp))
    except OSError as err:
        raise CliError(f"{out}: cannot write ({err.strerror or err})") from None


def _require_batchnorm(loaded: _Loaded, path: str, purpose: str) -> None:
    """CliError when the model has no batch-norm layer that ``purpose`` can act on (nothing is written)."""
    from ..tools._dataflow import is_batchnorm

    if any(is_batchnorm(m) for m in loaded.model.modules()):
        return
    extra = (
        f" ({len(loaded.notes)} exported in training mode or as primitive ops, which the tools cannot change)"
        if loaded.notes
        else ""
    )
    raise CliError(f"{path}: the model has no batch-norm layer{extra}: nothing to {purpose}; nothing written")


def _first_line(err: BaseException | str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else ""


def _eval(model: Any) -> None:
    for m in model.modules():  # set directly: exported programs' modules refuse .eval()
        m.training = False


def _shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(s) for s in parts if s.strip())
    except ValueError:
        raise CliError(f"--sample: expected a shape like 8,3,32,32, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise CliError(f"--sample: expected positive sizes like 8,3,32,32, got {text!r}")
    return shape


def _model_dtype(model: Any) -> Any:
    import torch

    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _check_data_spec(spec: str) -> None:
    """Check a data SPEC before any work: the named file exists, or the data set's package is installed."""
    if spec in ("digits", "digits-images"):
        require(["sklearn"], f"--data {spec}")
        return
    p = Path(spec)
    if p.suffix not in (".npy", ".pt") and not p.exists():
        raise CliError(f"--data: {spec!r} is neither 'digits', 'digits-images' nor an existing .npy/.pt file")
    check_input_file(spec, "--data")
    if p.suffix not in (".npy", ".pt"):
        raise CliError(f"--data: expected 'digits', 'digits-images', a .npy or a .pt file, got {spec!r}")


def load_data(spec: str) -> Any:
    """The input tensor (N, ...) named by a data SPEC (see the module docstring)."""
    import numpy as np
    import torch

    _check_data_spec(spec)
    if spec in ("digits", "digits-images"):
        from sklearn.datasets import load_digits

        x = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)  # (1797, 64)
        return x.reshape(-1, 1, 8, 8) if spec == "digits-images" else x
    p = Path(spec)
    if p.suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(p, allow_pickle=False))
        except Exception as err:
            raise CliError(f"--data {spec}: not a readable .npy array ({_first_line(err)}); {_DATA_NPY}") from None
    else:
        try:
            with _quiet_torch():
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:
            raise CliError(f"--data {spec}: {_weights_only_reason(err)}; {_DATA_PT}") from None
        if isinstance(obj, (tuple, list)) and obj:
            obj = obj[0]
        if not isinstance(obj, torch.Tensor):
            what = "a dict" if isinstance(obj, dict) else f"{type(obj).__name__} {_first_line(repr(obj))[:40]}"
            raise CliError(f"--data {spec}: holds {what}, not a tensor; {_DATA_PT}")
        x = obj
    if (
        x.ndim == 0
        or len(x) == 0
        or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))
    ):
        raise CliError(
            f"--data {spec}: holds {x.dtype} of shape {tuple(x.shape)}; expected numbers of shape (N, ...) with N >= 1"
        )
    return x


# ---------------------------------------------------------------------------- commands


def _inspect(args: argparse.Namespace) -> int:
    import torch

    from ..tools.inspect import format_table, inspect_model

    shape = _shape(args.sample) if args.sample else None
    loaded = _load(args.model, args.trust)
    sample = None
    if shape is not None:
        gen = torch.Generator().manual_seed(args.seed)
        sample = torch.randn(shape, generator=gen).to(_model_dtype(loaded.model))
    try:
        reports = inspect_model(loaded.model, sample)
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:  # AssertionError: export guards
        raise CliError(
            f"inspect: running the sample {tuple(sample.shape) if sample is not None else ''} failed: {_first_line(err)}"
        ) from None
    print(format_table(reports))
    loaded.print_notes()
    return 0


def _fold(args: argparse.Namespace) -> int:
    from ..tools.surgery import fold

    _check_paths(args.model, args.output)
    loaded = _load(args.model, args.trust)
    _require_batchnorm(loaded, args.model, "fold")
    _eval(loaded.model)
    result = fold(loaded.model, inplace=True)
    if not result.folded:
        reasons = "; ".join(f"{bn}: {why}" for bn, why in result.skipped) or "no batch norm next to a Linear/Conv"
        raise CliError(f"{args.model}: no batch norm could be folded ({reasons}); nothing written")
    print(result)
    loaded.print_notes()
    _save(loaded, args.output)
    print(f"wrote {args.output}")
    return 0


def _recalibrate(args: argparse.Namespace) -> int:
    from ..tools.stats import is_recomputable, recompute_statistics

    for option, value in (
        ("--batch-size", args.batch_size),
        ("--max-samples", args.max_samples),
        ("--passes", args.passes),
    ):
        if value is not None and value < 1:
            raise CliError(f"{option}: expected a positive int, got {value}")
    _check_data_spec(args.data)
    _check_paths(args.model, args.output)
    data = load_data(args.data)  # its content is checked before the model is loaded
    loaded = _load(args.model, args.trust)
    if not any(is_recomputable(m) for m in loaded.model.modules()):
        _require_batchnorm(loaded, args.model, "recalibrate")
        raise CliError(
            f"{args.model}: no batch-norm layer keeps running statistics: nothing to recalibrate; nothing written"
        )
    x = data.to(_model_dtype(loaded.model))
    batch_size = args.batch_size
    max_samples = args.max_samples if args.max_samples is None else min(args.max_samples, len(x))
    if loaded.program is not None:
        # an exported program is specialized to its example batch size: use it, drop the rest
        from ..tools._exported import example_inputs

        batch_size = int(example_inputs(loaded.program)[0][0].shape[0])
        usable = (min(len(x), max_samples or len(x)) // batch_size) * batch_size
        if usable == 0:
            raise CliError(
                f"recalibrate: the exported program takes batches of {batch_size}, but --data has only {len(x)} samples"
            )
        if usable < (max_samples or len(x)):
            print(f"note: the exported program takes batches of exactly {batch_size}; using the first {usable} samples")
        max_samples = usable
    try:
        report = recompute_statistics(
            loaded.model,
            x.split(batch_size),
            max_samples=max_samples,
            mode=args.mode,
            passes=args.passes,
        )
    except (RuntimeError, ValueError, TypeError, AssertionError) as err:  # AssertionError: export guards
        raise CliError(
            f"recalibrate: the model failed on --data {args.data} of shape {tuple(x.shape)}: {_first_line(err)}"
        ) from None
    width = max([5] + [len(r.name) for r in report])
    print(f"{'layer'.ljust(width)}  {'kind':<18} {'values':>9}  {'mean change':>11}  {'var change':>10}")
    for r in report:
        change = f"{_num(r.mean_change):>11}  {_num(r.var_change):>10}" if r.updated else f"not updated: {r.note}"
        print(f"{(r.name or '<model>').ljust(width)}  {r.kind:<18} {r.samples:>9}  {change}")
    print(f"{len(x) if max_samples is None else max_samples} samples; running_var holds the unbiased variance")
    loaded.print_notes()
    _save(loaded, args.output)
    print(f"wrote {args.output}")
    return 0


def _num(v: float) -> str:
    return str(v) if math.isinf(v) or math.isnan(v) else f"{v:.3g}"


def register(subparsers: Any) -> None:
    """Add ``inspect``, ``fold`` and ``recalibrate`` to the ``batchnorm`` command line."""
    trust_help = "allow loading a pickled whole module (torch.load weights_only=False): runs code from the file"

    p = subparsers.add_parser("inspect", help="report every batch-norm layer of a saved model")
    p.add_argument("model", metavar="MODEL", help="torch.save(model) file or torch.export .pt2")
    p.add_argument(
        "--sample", metavar="SHAPE", help="random N(0,1) input shape, e.g. 8,3,32,32, for the train/eval discrepancy"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample (default 0)")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("fold", help="fold eval-mode batch norms into adjacent Linear/Conv layers")
    p.add_argument("model", metavar="MODEL", help="torch.save(model) file or torch.export .pt2")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the folded model (same format)")
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(func=_fold)

    p = subparsers.add_parser("recalibrate", help="set running statistics to exact population statistics of a data set")
    p.add_argument("model", metavar="MODEL", help="torch.save(model) file or torch.export .pt2")
    p.add_argument("--data", required=True, metavar="SPEC", help="digits | digits-images | PATH.npy | PATH.pt (inputs)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write the model (same format)")
    p.add_argument(
        "--batch-size", type=int, default=256, help="batch size of the pass (the statistics do not depend on it)"
    )
    p.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    p.add_argument(
        "--mode",
        choices=("eval", "train"),
        default="eval",
        help="network that feeds each layer (see recompute_statistics)",
    )
    p.add_argument(
        "--passes", type=int, default=1, help="passes over the data (eval mode: BN depth + 1 makes all layers exact)"
    )
    p.add_argument("--trust", action="store_true", help=trust_help)
    p.set_defaults(func=_recalibrate)
