"""Distributed training: the collectives behind SyncBatchNorm and ``convert_sync_batchnorm``.

``collectives`` sits below the layers (the sync operators use it); ``convert`` sits above them.
This ``__init__`` imports neither, so either can be imported without the other.
"""
