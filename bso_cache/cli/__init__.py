"""The Typer command line, installed as `bso_cache.cli` (a thin shell over the library)."""
