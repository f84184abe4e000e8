"""Output files and folders of every kind (caches, runs, sweeps, reports): atomic writes, strict
JSON, and the checks an output folder passes before any work (writable, not nested)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.errors import ConfigError, OutputError


def atomic_write_text(path: Path, text: str) -> None:
    """Write under a temporary name, fsync, rename into place: a killed process leaves the old file
    or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot be written ({e.strerror}); free space or fix the permissions, then "
                          f"run the same command again") from None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def follow_umask(paths) -> None:
    """Give files the mode the process's umask gives any new file (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        if Path(path).is_file():
            os.chmod(path, 0o666 & ~mask)


def strict_json(obj):
    """`obj` with every NaN / infinity replaced by None, so that json.dumps writes strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """Strict JSON (null, never NaN) of a result or record."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def require_writable(path: Path, option: str, *, file: bool = False) -> None:
    """Refuse, before any work, an output folder (or `file`'s folder) that cannot be created or
    written: make the missing folders and a probe file, then remove what the probe made."""
    path = Path(path)
    folder = path.parent if file else path
    made = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    try:
        for attempt in range(5):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
                break
            except FileNotFoundError:  # another torchrun rank's probe removed the folder it had made
                if attempt == 4:
                    raise
        os.close(fd)
        os.unlink(probe)
        if file and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", str(path))
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot be written ({e.strerror or e}); choose a writable place, or fix "
                          f"the permissions or the mount") from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def enclosing(path: Path, what: str, *, itself: bool = True) -> Path | None:
    """The nearest folder at or above `path` (above only, unless `itself`) that is a cache (a
    manifest or an unfinished build's state) or a training run (its run_config.json), or None."""
    markers = {"cache": (S.MANIFEST_NAME, S.MANIFEST_NAME_V1, S.BUILD_STATE_NAME), "run": (S.RunLayout.RUN_CONFIG,)}
    path = Path(path).resolve()
    for folder in ([path] if itself else []) + list(path.parents):
        if any((folder / m).is_file() for m in markers[what]):
            return folder
    return None


def refuse_nesting(out: Path, option: str, kind: str) -> None:
    """A cache and a run never live inside one another: a run folder inside a cache breaks the readers
    of the cache's folder (pyarrow.parquet.read_table), and --overwrite of one would reach into the other."""
    cache = enclosing(out, "cache", itself=kind != "cache")
    run = enclosing(out, "run", itself=kind != "run")
    for found, what in ((cache, "cache"), (run, "training run")):
        if found is not None:
            raise ConfigError(f"{option} {out} is inside the {what} {found}; a {kind} there would mix with its files: "
                              f"choose a folder outside it")


def check_out(out: Path, kind: str) -> None:
    """An output folder (`--out`) of a cache, run or sweep: not a file, not nested in the other kind,
    writable."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the {kind}")
    refuse_nesting(out, "--out", kind)
    require_writable(out, "--out")
