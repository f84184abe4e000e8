"""Input rows (sources.py) -> normalised preference pairs, every row accounted for.

Formats, detected from the columns of the first row (or forced):

- `pku`:     prompt, response_0, response_1, is_response_0_safe, is_response_1_safe,
             better_response_id, safer_response_id (+ *_severity_level). chosen = the better
             response; labels s = not is_response_i_safe; which one is safer is kept.
- `hh`:      chosen / rejected dialogue strings ("\\n\\nHuman: ...\\n\\nAssistant: ...").
             The prompt is the conversation the two share before their last diverging
             assistant turn (a few real rows do not share the whole prefix; see `split_hh`).
- `generic`: prompt, chosen, rejected as strings or chat-message lists, with optional
             per-response safety labels (`chosen_unsafe` / `is_chosen_safe`, ...).

A malformed row raises `DataError` naming the file, the row and the field; with
`skip_bad_rows` the builder counts it as dropped under `DataError.reason` instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bso_cache.config import FORMATS
from bso_cache.errors import ConfigError, DataError
from bso_cache.data.sources import RawRow

Message = dict  # {"role": str, "content": str}


@dataclass(frozen=True)
class Pair:
    """One normalised preference pair. Safety labels: True = unsafe, None = unknown."""

    source_index: int
    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...), ends with a user turn
    chosen: str
    rejected: str
    chosen_unsafe: bool | None = None
    rejected_unsafe: bool | None = None
    safer_is_chosen: bool | None = None
    chosen_severity: int | None = None
    rejected_severity: int | None = None

    @property
    def messages(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    @property
    def pair_id(self) -> str:
        payload = json.dumps([self.source_index, self.prompt, self.chosen, self.rejected],
                             ensure_ascii=False, separators=(",", ":"))
        return hashlib.blake2b(payload.encode("utf-8"), digest_size=12).hexdigest()


# --- format detection and normalisation --------------------------------------------------------

PKU_REQUIRED = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                "better_response_id", "safer_response_id")
GENERIC_LABELS = {  # column -> (which response, True if the column says "unsafe")
    "chosen_unsafe": ("chosen", True), "rejected_unsafe": ("rejected", True),
    "is_chosen_safe": ("chosen", False), "is_rejected_safe": ("rejected", False),
    "chosen_safe": ("chosen", False), "rejected_safe": ("rejected", False),
}


def detect_format(row: dict) -> str:
    """The format of a row, from its columns (and, without a prompt column, the responses' type)."""
    columns = set(row)
    if {"response_0", "response_1", "better_response_id"} <= columns:
        return "pku"
    if {"prompt", "chosen", "rejected"} <= columns:
        return "generic"
    if {"chosen", "rejected"} <= columns:
        # no prompt column: whole dialogues sharing their start, as text (HH-RLHF) or as chat
        # messages (TRL's implicit-prompt conversational format)
        return "implicit" if isinstance(row["chosen"], list) else "hh"
    raise ConfigError(
        f"cannot tell the input format from the columns {sorted(columns)}; expected PKU-SafeRLHF "
        f"({', '.join(PKU_REQUIRED)}), HH-RLHF (chosen, rejected as dialogue text), TRL's implicit prompt "
        f"(chosen, rejected as message lists) or generic (prompt, chosen, rejected). Rename the columns or "
        f"pass --format"
    )


class Normaliser:
    """Turns raw rows of one format into `Pair`s, raising `DataError` on malformed rows."""

    def __init__(self, fmt: str = "auto"):
        if fmt not in FORMATS:
            raise ConfigError(f"unknown --format '{fmt}'; valid: {', '.join(FORMATS)}")
        self.format = fmt
        self.notes: dict[str, int] = {}

    def __call__(self, raw: RawRow, source_index: int) -> Pair:
        if raw.error is not None:
            raise raw.error
        data = raw.data
        if self.format == "auto":
            self.format = detect_format(data)
        ctx = _Ctx(raw.source, raw.row, raw.line)
        if self.format == "pku":
            return _pku(data, source_index, ctx)
        if self.format == "hh":
            pair, common_prefix = _hh(data, source_index, ctx)
            if common_prefix:
                self.notes["hh_prompt_from_common_prefix"] = self.notes.get("hh_prompt_from_common_prefix", 0) + 1
            return pair
        if self.format == "implicit":
            return _implicit(data, source_index, ctx)
        return _generic(data, source_index, ctx)


@dataclass
class _Ctx:
    source: str
    row: int
    line: int | None = None

    def error(self, message: str, reason: str, fieldname: str | None = None) -> DataError:
        return DataError(message + "; fix the row or pass --skip-bad-rows", reason=reason,
                         source=self.source, row=self.row, field=fieldname, line=self.line)


def _get(data: dict, key: str, ctx: _Ctx) -> Any:
    if key not in data:
        raise ctx.error("missing field", "missing_field", key)
    value = data[key]
    if value is None:
        raise ctx.error("is null", "null_field", key)
    return value


def _text(data: dict, key: str, ctx: _Ctx, *, response: bool = False) -> str:
    value = _get(data, key, ctx)
    if not isinstance(value, str):
        raise ctx.error(f"expected a string, got {type(value).__name__}", "wrong_type", key)
    if not value.strip():
        raise ctx.error("is empty", "empty_response" if response else "empty_prompt", key)
    return value


def _flag(data: dict, key: str, ctx: _Ctx, *, required: bool = True) -> bool | None:
    if not required and data.get(key) is None:
        return None
    value = _get(data, key, ctx)
    if not isinstance(value, bool):
        raise ctx.error(f"expected true or false, got {value!r}", "bad_label", key)
    return value


def _integral(value, key: str, ctx: _Ctx):
    """An integer written as a float (pandas writes 0.0 / 1.0, and NaN where a value is missing)."""
    if isinstance(value, float):
        if value != value:
            raise ctx.error("is NaN (a missing value, as pandas writes it)", "null_field", key)
        if value.is_integer():
            return int(value)
    return value


def _response_id(data: dict, key: str, ctx: _Ctx) -> int:
    value = _integral(_get(data, key, ctx), key, ctx)
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise ctx.error(f"expected 0 or 1, got {value!r}", "bad_id", key)
    return value


def _severity(data: dict, key: str, ctx: _Ctx) -> int | None:
    value = data.get(key)
    if value is None or (isinstance(value, float) and value != value):  # severities are optional
        return None
    value = _integral(value, key, ctx)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 127:
        raise ctx.error(f"expected a small non-negative integer, got {value!r}", "wrong_type", key)
    return value


def _distinct(chosen: str, rejected: str, ctx: _Ctx, field_name: str) -> None:
    if chosen == rejected:
        raise ctx.error("chosen and rejected responses are identical", "identical_responses", field_name)
    if chosen.split() == rejected.split():  # no preference to learn from a difference in spacing
        raise ctx.error("chosen and rejected responses are identical up to whitespace",
                        "identical_responses", field_name)


def _pku(data: dict, index: int, ctx: _Ctx) -> Pair:
    prompt = _text(data, "prompt", ctx)
    responses = [_text(data, "response_0", ctx, response=True), _text(data, "response_1", ctx, response=True)]
    safe = [_flag(data, "is_response_0_safe", ctx), _flag(data, "is_response_1_safe", ctx)]
    better = _response_id(data, "better_response_id", ctx)
    safer = _response_id(data, "safer_response_id", ctx)
    severity = [_severity(data, "response_0_severity_level", ctx),
                _severity(data, "response_1_severity_level", ctx)]
    _distinct(responses[0], responses[1], ctx, "response_1")
    worse = 1 - better
    return Pair(index, (("user", prompt),), responses[better], responses[worse],
                chosen_unsafe=not safe[better], rejected_unsafe=not safe[worse],
                safer_is_chosen=safer == better, chosen_severity=severity[better],
                rejected_severity=severity[worse])


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_hh_dialogue(text: str) -> list[tuple[str, str]]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [('user', 'a'), ('assistant', 'b')]."""
    turns: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        h, a = text.find(HUMAN, pos), text.find(ASSISTANT, pos)
        starts = [(i, m) for i, m in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, marker = min(starts)
        if i > pos and turns:  # text between markers belongs to the previous turn
            role, content = turns[-1]
            turns[-1] = (role, content + text[pos:i])
        body_start = i + len(marker)
        nxt = [j for j in (text.find(HUMAN, body_start), text.find(ASSISTANT, body_start)) if j >= 0]
        end = min(nxt) if nxt else len(text)
        turns.append(("user" if marker == HUMAN else "assistant", text[body_start:end].strip()))
        pos = end
    return turns


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str, bool]:
    """(shared prompt text, chosen response, rejected response, used_common_prefix).

    The prompt is the text both dialogues share up to the last assistant marker that both have
    at the same place. Normally that is each dialogue's last assistant turn; in the few real rows
    where the two diverge earlier (for example a mistyped "Hum:" marker that swallows turns),
    the remainders become the responses, as TRL's prompt extraction does.
    """
    k = 0
    limit = min(len(chosen), len(rejected))
    while k < limit and chosen[k] == rejected[k]:
        k += 1
    cut = chosen.rfind(ASSISTANT, 0, k)
    if cut < 0:
        return "", chosen, rejected, False
    normal = cut == chosen.rfind(ASSISTANT) and cut == rejected.rfind(ASSISTANT)
    body = cut + len(ASSISTANT)
    return chosen[:cut], chosen[body:].strip(), rejected[body:].strip(), not normal


def _hh(data: dict, index: int, ctx: _Ctx) -> tuple[Pair, bool]:
    chosen_text = _text(data, "chosen", ctx, response=True)
    rejected_text = _text(data, "rejected", ctx, response=True)
    _distinct(chosen_text, rejected_text, ctx, "rejected")
    prompt_text, chosen, rejected, common_prefix = split_hh(chosen_text, rejected_text)
    turns = parse_hh_dialogue(prompt_text)
    if not turns or turns[-1][0] != "user":
        raise ctx.error("no '\\n\\nHuman: ... \\n\\nAssistant:' prompt shared by chosen and rejected",
                        "bad_dialogue", "chosen")
    if not chosen:
        raise ctx.error("the last assistant turn is empty", "empty_response", "chosen")
    if not rejected:
        raise ctx.error("the last assistant turn is empty", "empty_response", "rejected")
    _distinct(chosen, rejected, ctx, "rejected")
    return Pair(index, tuple(turns), chosen, rejected), common_prefix


def _messages(value: Any, key: str, ctx: _Ctx) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise ctx.error("expected a string or a non-empty list of chat messages", "wrong_type", key)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ctx.error(f"message {i} needs string 'role' and 'content'", "wrong_type", key)
        out.append((m["role"], m["content"]))
    return out


def _one_turn(turns: list[tuple[str, str]], key: str, ctx: _Ctx) -> str:
    """A response given as messages must be one assistant message: a longer continuation
    (assistant, user, assistant, ...) is refused, never silently cut to its last message."""
    if len(turns) != 1 or turns[0][0] != "assistant":
        roles = ", ".join(r for r, _ in turns) or "none"
        raise ctx.error(f"the response is {len(turns)} message(s) ({roles}); bso-cache scores one assistant "
                        f"message as the response: move the earlier turns into the prompt", "multi_turn_response", key)
    if not turns[0][1].strip():
        raise ctx.error("is empty", "empty_response", key)
    return turns[0][1]


def _generic_response(data: dict, key: str, ctx: _Ctx) -> str:
    value = _get(data, key, ctx)
    if isinstance(value, str):
        return _text(data, key, ctx, response=True)
    return _one_turn(_messages(value, key, ctx), key, ctx)


def _generic(data: dict, index: int, ctx: _Ctx) -> Pair:
    prompt_value = _get(data, "prompt", ctx)
    if isinstance(prompt_value, str):
        prompt = (("user", _text(data, "prompt", ctx)),)
    else:
        prompt = tuple(_messages(prompt_value, "prompt", ctx))
    chosen = _generic_response(data, "chosen", ctx)
    rejected = _generic_response(data, "rejected", ctx)
    _distinct(chosen, rejected, ctx, "rejected")
    c, r, safer = _labels(data, ctx)
    return Pair(index, prompt, chosen, rejected, chosen_unsafe=c, rejected_unsafe=r, safer_is_chosen=safer)


def _labels(data: dict, ctx: _Ctx) -> tuple[bool | None, bool | None, bool | None]:
    """(chosen unsafe, rejected unsafe, safer is chosen) from the optional generic label columns."""
    labels: dict[str, bool | None] = {"chosen": None, "rejected": None}
    for column, (which, says_unsafe) in GENERIC_LABELS.items():
        flag = _flag(data, column, ctx, required=False)
        if flag is not None:
            labels[which] = flag if says_unsafe else not flag
    c, r = labels["chosen"], labels["rejected"]
    return c, r, (None if c is None or r is None or c == r else (not c))


def _implicit(data: dict, index: int, ctx: _Ctx) -> Pair:
    """TRL's implicit prompt: chosen and rejected are whole conversations (message lists) that share
    their leading turns; the shared turns are the prompt, what follows in each is its response."""
    chosen = _messages(_get(data, "chosen", ctx), "chosen", ctx)
    rejected = _messages(_get(data, "rejected", ctx), "rejected", ctx)
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    prompt = chosen[:k]
    if not prompt or prompt[-1][0] != "user":
        raise ctx.error("chosen and rejected share no leading turns ending with a user message, so there is no "
                        "prompt; give a prompt column (generic format) or conversations that share their start",
                        "bad_dialogue", "chosen")
    c, r = _one_turn(chosen[k:], "chosen", ctx), _one_turn(rejected[k:], "rejected", ctx)
    _distinct(c, r, ctx, "rejected")
    labels = _labels(data, ctx)
    return Pair(index, tuple(prompt), c, r, chosen_unsafe=labels[0], rejected_unsafe=labels[1],
                safer_is_chosen=labels[2])


def scan_input(source, fmt: str, skip_bad_rows: bool) -> tuple[int, str, int]:
    """A quick pass over the input (no tokenizing): counts the rows, detects the format from the
    first readable row, stops at the first bad row unless they are to be skipped, and counts the
    rows whose prompt and responses repeat an earlier row's (kept: the count goes to the notes)."""
    normalise = Normaliser(fmt)
    n, seen, duplicates = 0, set(), 0
    for n, raw in enumerate(source.rows(), start=1):
        if normalise.format == "auto" and raw.data is not None:
            normalise.format = detect_format(raw.data)
        try:
            pair = normalise(raw, n - 1)  # raises DataError naming file, row, field
        except DataError:
            if not skip_bad_rows:
                raise
            continue
        key = hashlib.blake2b(json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False).encode(),
                              digest_size=16).digest()
        duplicates += key in seen
        seen.add(key)
    if n == 0:
        raise DataError("the input has no rows", reason="empty_input", source=source.spec)
    if normalise.format == "auto":
        raise DataError("no row of the input could be read", reason="unreadable", source=source.spec)
    return n, normalise.format, duplicates
