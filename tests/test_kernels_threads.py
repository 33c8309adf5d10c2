"""The numba kernels' runtime leaves torch's intra-op thread count alone.

numba's OpenMP layer sets the OpenMP thread count when its pool starts; with torch's pip wheels
that is torch's own libgomp, so without care our first parallel launch undid a
``torch.set_num_threads(1)``. Each check runs in a fresh interpreter: the pool starts once per
process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

_SCRIPT = """
import torch
import batchnorm
torch.set_num_threads(1)
assert torch.get_num_threads() == 1  # read once before, as the lab's runner does when it saves the count
layer = batchnorm.BatchNorm1d(64).eval()
with torch.no_grad(), batchnorm.use_backend("numba"):
    layer(torch.randn(4096, 64))  # 262144 values: the parallel kernels
    after_eval = torch.get_num_threads()
layer.train()
with batchnorm.use_backend("numba"):
    layer(torch.randn(4096, 64, requires_grad=True)).sum().backward()
import numba
print(after_eval, torch.get_num_threads(), numba.get_num_threads())
"""


def test_first_parallel_launch_keeps_torch_threads() -> None:
    env = dict(os.environ, NUMBA_NUM_THREADS="2")  # numba's pool wants 2 threads even on 1 core
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    after_eval, after_train, numba_threads = (int(v) for v in out.stdout.split())
    assert numba_threads == 2  # the pool did start with its own count
    assert (after_eval, after_train) == (1, 1)
