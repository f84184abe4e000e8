"""One rooted exception hierarchy.

Every error a user can cause (bad input, bad options, a damaged or mismatched cache) is a
`BsoCacheError`. The CLI prints it as one line and exits non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class BsoCacheError(Exception):
    """Root of the project's own errors. The message says what is wrong and what to do."""


class ConfigError(BsoCacheError):
    """An option or a combination of options is invalid."""


class DataError(BsoCacheError):
    """An input row or file is malformed. The message names the file, the row and the field."""

    def __init__(self, message: str, *, reason: str = "bad_row", source: str | None = None,
                 row: int | None = None, field: str | None = None, line: int | None = None):
        where = []
        if source is not None:
            where.append(str(source))
        if row is not None:  # rows count from 1 in every file type; a JSON-lines file also says the line
            where.append(f"row {row}" + (f" (line {line})" if line is not None and line != row else ""))
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.reason = reason
        self.source = source
        self.row = row
        self.field = field


class CacheError(BsoCacheError):
    """A cache is damaged, unfinished, of another schema version, or does not fit the run."""


class ManifestError(CacheError):
    """A manifest that does not follow the contract; the message names the field."""


class OutputError(BsoCacheError):
    """An output file cannot be written (a full disk, a read-only folder); nothing half-written is left."""


class MismatchError(CacheError):
    """The policy (tokenizer, weights) does not fit the cache."""


class TrainingError(BsoCacheError):
    """Training cannot go on (for example a non-finite loss); the message says what to change."""
