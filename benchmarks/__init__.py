"""On-demand benchmarks: each module runs with ``python -m benchmarks.NAME`` and prints ratios
measured in the same run, against PyTorch. Not part of ``make test``."""
