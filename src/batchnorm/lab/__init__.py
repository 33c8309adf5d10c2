"""The lab: reproducible, small-scale experiments from the batch-normalization literature.

Each experiment (``experiments/``, listed by ``registry``) trains small networks on CPU-sized
data (scikit-learn digits by default, MNIST-1D, or MNIST IDX files) over seeds, saves its
measurements to ``results.json`` first, judges the paper's claims from those saved numbers
(``verdict``), and draws figures and an HTML report from them (so a report can be redrawn
without retraining). Nothing heavy (matplotlib, scikit-learn, mnist1d) is imported until needed.

    batchnorm lab list
    batchnorm lab run ioffe2015-fig1 --quick --out runs/
    batchnorm lab report runs/
    batchnorm lab replicate --data digits,mnist1d --seeds 0-4 --quick
"""

from .config import MODES, RunConfig

__all__ = ["MODES", "RunConfig"]
