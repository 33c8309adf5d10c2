"""Kernel back-ends and the dispatch between them (private).

A back-end is a module exposing ``train_forward``, ``eval_forward`` and ``backward`` with the
signatures of `batchnorm._kernels.torch_ops`. See `batchnorm._kernels.dispatch`.
"""
