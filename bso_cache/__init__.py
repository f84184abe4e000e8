"""bso-cache: BSO preference training from an offline reference-log-prob cache.

`bso-cache build` scores preference pairs with the frozen reference model once and writes
Parquet shards + a manifest; `bso-cache train` streams them and trains the policy alone.
Heavy dependencies (torch, transformers, polars, datasets) are imported where used.
"""

__version__ = "0.2.0"
