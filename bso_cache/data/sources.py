"""Where input rows come from, streamed: local JSONL / JSON / Parquet / CSV files or folders of
them, a folder written by `datasets.Dataset.save_to_disk`, or a Hugging Face dataset name
(`datasets.load_dataset`, streaming). Each row is a `RawRow`: its data, or the error reading it
raised (kept so that `--skip-bad-rows` can count it); formats.py turns rows into pairs.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from bso_cache.errors import ConfigError, DataError
from bso_cache.hashing import sha256_files

TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
COMPRESSIONS = (".gz", ".zst", ".bz2")   # e.g. HH-RLHF ships as .jsonl.gz
FILE_SUFFIXES = TEXT_SUFFIXES + (".parquet",) + tuple(s + c for s in TEXT_SUFFIXES for c in COMPRESSIONS)


class _Stream(io.RawIOBase):
    """A pyarrow input stream (which decompresses) as a Python binary file, for line iteration."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self.stream.close()
        super().close()


def _open_binary(path: Path):
    """The file's bytes, decompressed by its suffix (.gz, .zst, .bz2)."""
    if str(path).endswith(COMPRESSIONS):
        import pyarrow as pa

        return io.BufferedReader(_Stream(pa.input_stream(str(path), compression="detect")))
    return open(path, "rb")


def _base_suffix(path: Path) -> str:
    name = str(path)
    for c in COMPRESSIONS:
        name = name.removesuffix(c)
    return name[name.rfind("."):]


@dataclass
class RawRow:
    """A row as read, or the error that reading it raised (kept so it can be counted)."""

    source: str
    row: int            # the row's number in its file, from 1, for every file type
    data: dict | None
    error: DataError | None = None
    line: int | None = None  # JSON lines: the line (differs from `row` past blank lines)


@dataclass
class InputSource:
    """Where the rows come from, resolved once; `rows()` streams them."""

    spec: str
    files: list[Path] = field(default_factory=list)
    hf_name: str | None = None
    hf_config: str | None = None
    split: str = "train"
    from_disk: bool = False

    def describe(self) -> dict:
        return {"spec": self.spec, "files": [str(p.resolve()) for p in self.files], "hf_name": self.hf_name,
                "hf_config": self.hf_config, "split": self.split}

    def digest(self) -> str:
        """sha256 over the bytes of every input file (names included), or the HF identity."""
        if self.files:
            return sha256_files(self.files)
        h = hashlib.sha256()
        ds = self._load_hf()
        fp = getattr(ds, "_fingerprint", None) or getattr(getattr(ds, "info", None), "version", None)
        h.update(json.dumps([self.hf_name, self.hf_config, self.split, str(fp)]).encode())
        return "hf:" + h.hexdigest()

    def _load_hf(self):
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise ConfigError("reading a Hugging Face dataset needs the `datasets` package") from e
        try:
            if self.from_disk:
                ds = datasets.load_from_disk(self.hf_name)
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise ConfigError(f"{self.hf_name}: no split '{self.split}'; splits: {list(ds)}")
                    ds = ds[self.split]
                return ds
            return datasets.load_dataset(self.hf_name, self.hf_config, split=self.split, streaming=True)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets raises many types; report them as one line
            raise ConfigError(
                f"could not open '{self.spec}' as a local file or folder, nor as a Hugging Face "
                f"dataset: {type(e).__name__}: {e}"
            ) from None

    def rows(self) -> Iterator[RawRow]:
        """Stream rows in a fixed order."""
        if self.files:
            for path in self.files:
                yield from _file_rows(path)
            return
        for i, record in enumerate(self._load_hf(), start=1):
            yield RawRow(self.spec, i, dict(record))


def open_source(spec: str, *, split: str = "train", hf_config: str | None = None) -> InputSource:
    """Resolve `--data`: a file, a folder of files, a save_to_disk folder, or a dataset name."""
    path = Path(spec)
    if path.is_file():
        if not spec.endswith(FILE_SUFFIXES):
            raise ConfigError(f"{spec}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")
        _check_readable(path)
        return InputSource(spec, files=[path], split=split)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() \
                or (path / "state.json").exists():
            return InputSource(spec, hf_name=str(path), split=split, from_disk=True)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        if not files:
            raise ConfigError(f"{spec}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        for p in files:
            _check_readable(p)
        return InputSource(spec, files=files, split=split)
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")) or spec.endswith(FILE_SUFFIXES):
        raise ConfigError(f"{spec}: no such file or folder")
    return InputSource(spec, hf_name=spec, hf_config=hf_config, split=split)


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file ({e.strerror})") from None


def _file_rows(path: Path) -> Iterator[RawRow]:
    """Rows numbered from 1 in every file type (`RawRow.row`); JSON lines also name their line."""
    suffix = _base_suffix(path)
    if suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_rows(path)
    elif suffix == ".json":
        yield from _json_rows(path)
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".csv":
        yield from _csv_rows(path)


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    name = str(path)
    row = 0
    with _open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row += 1
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                yield RawRow(name, row, None, DataError(
                    f"invalid JSON ({msg}); fix the line or pass --skip-bad-rows",
                    reason="invalid_json", source=name, row=row, line=lineno), line=lineno)
                continue
            if not isinstance(data, dict):
                yield RawRow(name, row, None, DataError(
                    f"expected a JSON object, got {type(data).__name__}", reason="invalid_json",
                    source=name, row=row, line=lineno), line=lineno)
                continue
            yield RawRow(name, row, data, line=lineno)


def _json_rows(path: Path) -> Iterator[RawRow]:
    """A .json file: a JSON array of objects (streamed with ijson) or JSON lines."""
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_rows(path)
        return
    import ijson

    name = str(path)
    with _open_binary(path) as f:
        try:
            for i, data in enumerate(ijson.items(f, "item", use_float=True), start=1):
                if not isinstance(data, dict):
                    yield RawRow(name, i, None, DataError(
                        f"expected a JSON object, got {type(data).__name__}",
                        reason="invalid_json", source=name, row=i))
                    continue
                yield RawRow(name, i, data)
        except ijson.JSONError as e:
            raise DataError(f"invalid JSON ({e}); the file cannot be read past this point",
                            reason="invalid_json", source=name) from None


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError
        raise DataError(f"not a readable Parquet file ({e})", reason="unreadable", source=name) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            i += 1
            yield RawRow(name, i, data)


def _csv_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.csv as pcsv

    name = str(path)
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 22))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"not a readable CSV file ({e})", reason="unreadable", source=name) from None
    i = 0
    for batch in reader:
        for data in batch.to_pylist():
            i += 1
            yield RawRow(name, i, data)
