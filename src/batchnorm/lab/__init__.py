"""The lab: reproducible, small-scale experiments from the batch-normalization literature.

Each experiment trains small networks on CPU-sized data (scikit-learn digits by default,
MNIST-1D, or MNIST IDX files), saves its measurements to ``results.json`` first, judges the
paper's claims from those saved numbers, and draws figures and an HTML report from them (so a
report can be redrawn without retraining).

    batchnorm lab list
    batchnorm lab run ioffe2015-fig1 --quick --out runs/
    batchnorm lab run all --quick
    batchnorm lab report runs/
    batchnorm lab replicate --data digits,mnist1d --seeds 0-4 --quick

Modules: ``config`` (RunConfig), ``datasets``, ``models``, ``training``, ``popstats``
(Alg. 2 population statistics), ``registry`` (the experiment list), ``runner``, ``report``,
``figures`` (plot helpers), ``verdict`` (claims judged over seeds), ``experiment`` (the
multi-seed Experiment base), ``stacked`` (the seeds of an MLP trained together), ``replicate``
(the replication matrix), ``experiments/`` (one module per experiment).
Nothing heavy (matplotlib, scikit-learn, mnist1d) is imported until it is needed.
"""

from .config import MODES, RunConfig

__all__ = ["MODES", "RunConfig"]
