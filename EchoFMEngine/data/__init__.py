"""Data layer: dataset layouts behind one registry, the pretraining clip cache, augmentations.

``build_dataset(name, root, split=..., **options)`` (names: :func:`dataset_names`),
``ClipCache(dir)`` and ``bench_cache(...)`` for prepared clip shards, and the paper's
augmentations in :mod:`EchoFMEngine.data.augment`. Heavy modules load on first use.
"""
from __future__ import annotations

from EchoFMEngine.data.datasets import DATASETS, EchoDataset, build_dataset, dataset_names

__all__ = ["DATASETS", "EchoDataset", "build_dataset", "dataset_names", "ClipCache", "bench_cache",
           "segmentation_augment", "classification_augment", "build_augment"]


def __getattr__(name):
    if name in ("ClipCache", "bench_cache", "CacheWriter"):
        from EchoFMEngine.data import cache  # deferred: cache loads torch; the dataset registry does without it

        return getattr(cache, name)
    if name in ("segmentation_augment", "classification_augment", "build_augment"):
        from EchoFMEngine.data import augment  # deferred: augment loads torch, as above

        return getattr(augment, name)
    raise AttributeError(f"module 'EchoFMEngine.data' has no attribute {name!r}")
