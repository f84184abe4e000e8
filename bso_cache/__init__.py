"""bso-cache: BSO preference training from an offline reference-log-prob cache.

`bso-cache build` scores preference pairs with the frozen reference model once and writes
Parquet shards + a manifest; `bso-cache train` streams them and trains the policy alone.

The Python API (docs/API.md) is what `__all__` names; each name is imported on first use, so
`import bso_cache` stays light (torch, transformers, polars and datasets load where used).
"""

__version__ = "0.2.0"

# public name -> (the module that defines it, its name there); no public name is a submodule's
# name (`bso_cache.training.train` is the module; its `train` function is `train_policy` here)
_PUBLIC = {
    "bso_loss": ("losses", "bso_loss"), "make_loss_spec": ("losses", "make_loss_spec"),
    "spec_loss": ("losses", "spec_loss"), "LOSS_DEFAULTS": ("losses", "LOSS_DEFAULTS"),
    "GENERATORS": ("losses", "GENERATORS"), "Cache": ("cache", "Cache"),
    "CacheDataset": ("data.dataset", "CacheDataset"), "collate_pairs": ("data.dataset", "collate_pairs"),
    "score_pairs": ("scoring.scorer", "score_pairs"), "sequence_logps": ("scoring.scorer", "sequence_logps"),
    "PairLogps": ("scoring.scorer", "PairLogps"), "BuildConfig": ("config", "BuildConfig"),
    "TrainConfig": ("config", "TrainConfig"), "EvalConfig": ("config", "EvalConfig"),
    "build_cache": ("cache.build", "build_cache"), "train_policy": ("training.train", "train"),
    "evaluate_cache": ("reporting.evaluate", "evaluate_cache"),
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        module, attr = _PUBLIC[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'bso_cache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
