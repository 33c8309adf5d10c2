"""The compiled eager step: a BatchNorm*d call on small CPU tensors as one C++ call (private).

On a small tensor a layer call costs its Python, not its kernels. The eager step that runs
aten's kernel with our guard on top (`batchnorm.ops.aten_step.train_aten`: copy the running
statistics, run aten's training kernel, check the batch statistics, undo the update of a
non-finite or ill-conditioned batch) takes about a dozen Python-level tensor calls; written in
C++ (``step_ext.cpp`` beside this file) it is one, and a layer call then costs no more than
``torch.nn.BatchNorm*d``'s (``python -m benchmarks.bn_small``). The C++ and the Python forms
return the same thing (tested bit for bit, with the extension built and without).

The extension is compiled with the C++ compiler that ``torch.utils.cpp_extension`` finds,
**only when asked** (``batchnorm build-ext``, run by ``make install``; about half a minute) —
never on import or on a layer call — into a cache directory keyed by the source, the torch and
the Python version (``$BATCHNORM_EXT_DIR``, default ``~/.cache/batchnorm/ext``). Afterwards
every process loads it from there on first use. Without a compiler, or with
``BATCHNORM_EXT=0`` in the environment, everything works the same through the Python form.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["build", "library_path", "load", "status"]

_SOURCE = Path(__file__).with_name("step_ext.cpp")
_state: dict[str, ModuleType | None] = {}
_why: dict[str, str] = {}


def _name() -> str:
    """The module name: the source's hash with the torch and Python versions (a build for another
    torch or source is never loaded)."""
    key = hashlib.sha256(_SOURCE.read_bytes())
    key.update(f"{torch.__version__}|{sys.version_info[:2]}".encode())
    return f"batchnorm_step_{key.hexdigest()[:16]}"


def _directory() -> Path:
    root = os.environ.get("BATCHNORM_EXT_DIR") or Path.home() / ".cache" / "batchnorm" / "ext"
    return Path(root) / _name()


def library_path() -> Path:
    """Where the compiled extension for this source, torch and Python is (or would be) stored."""
    return _directory() / f"{_name()}.so"


def load() -> ModuleType | None:
    """The compiled extension, loaded once per process, or None: not built, or disabled with
    ``BATCHNORM_EXT=0`` (`status` says which). Never compiles."""
    if "module" in _state:
        return _state["module"]
    module = None
    path = library_path()
    if os.environ.get("BATCHNORM_EXT", "1") == "0":
        _why["module"] = "disabled by BATCHNORM_EXT=0"
    elif not path.is_file():
        _why["module"] = f"not built (run `batchnorm build-ext`; it would be stored at {path})"
    else:
        try:
            spec = importlib.util.spec_from_file_location(_name(), path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _why["module"] = f"loaded from {path}"
        except (ImportError, OSError) as err:  # a stale or broken file: the Python form runs
            module = None
            _why["module"] = f"could not be loaded from {path}: {err}"
    _state["module"] = module
    return module


def status() -> str:
    """One line: whether the compiled step is in use, and why not."""
    load()
    return _why["module"]


def build(verbose: bool = False) -> Path:
    """Compile the extension into `library_path`'s directory (a no-op when it is up to date) and
    return the library's path. Raises ``RuntimeError``/``OSError`` (from
    ``torch.utils.cpp_extension``) when no working C++ compiler is found."""
    from torch.utils.cpp_extension import load as compile_and_load

    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    module = compile_and_load(
        name=_name(),
        sources=[str(_SOURCE)],
        build_directory=str(directory),
        extra_cflags=["-O3"],
        verbose=verbose,
    )
    _state["module"] = module
    _why["module"] = f"loaded from {library_path()}"
    return library_path()
