"""Digests of files, streamed (never a whole file in memory): one helper for shards, weights and inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

BLOCK = 1 << 22


def sha256_files(paths: Iterable[Path], *, with_names: bool = True) -> str:
    """'sha256:<hex>' over the bytes of `paths` in order, each preceded by its file name when
    `with_names` (so renaming a weight or input file changes the digest)."""
    h = hashlib.sha256()
    for path in paths:
        if with_names:
            h.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def file_sha256(path: Path) -> str:
    """'sha256:<hex>' of one file's bytes (a shard's checksum)."""
    return sha256_files([path], with_names=False)
