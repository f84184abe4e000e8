"""Pairs -> token ids with an exact prompt/response boundary.

With a chat template (the tokenizer's own, or `--chat-template FILE`):
    prompt text   = template(conversation, add_generation_prompt=True)
    response text = template(conversation + [assistant: response])[len(prompt text):]
so the response includes the template's end-of-turn token(s). Both are tokenized separately
with add_special_tokens=False (the template places BOS itself), so no token merges across the
boundary, and `prompt_ids + response_ids` is exactly what the model is scored on and would see
when generating after the prompt.

Without a chat template (the documented plain fallback):
    prompt text   = "Human: <turn>\\n\\nAssistant: <turn>\\n\\n...Human: <last turn>\\n\\nAssistant:"
                    (system turns as "System: ..."), tokenized WITH the tokenizer's special
                    tokens (BOS when the tokenizer adds one)
    response      = " " + response, tokenized without special tokens, then EOS appended
                    (when the tokenizer has one)
This is the layout of HH-RLHF dialogues.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from bso_cache.data.formats import Pair
from bso_cache.config import TEMPLATE_MODES
from bso_cache.errors import ConfigError, DataError

PLAIN_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def pair_length(prompt, chosen, rejected, shared: bool) -> int:
    """Tokens one pair occupies in a row: prompt + chosen + rejected when the prompt is shared,
    else the longer of its two sequences (the width it pads its batch to)."""
    if shared:
        return len(prompt) + len(chosen) + len(rejected)
    return len(prompt) + max(len(chosen), len(rejected))


@dataclass
class PairTokens:
    """A pair's token ids exactly as they are scored and cached."""

    prompt_ids: np.ndarray    # (P,) int32: compact (4 bytes a token, not a Python int's ~36)
    chosen_ids: np.ndarray    # (C,) int32
    rejected_ids: np.ndarray  # (R,) int32
    truncated: bool = False

    @property
    def length(self) -> int:
        """Tokens of the longer of the two scored sequences (what --max-length bounds)."""
        return pair_length(self.prompt_ids, self.chosen_ids, self.rejected_ids, shared=False)


def tokenizer_digest(tokenizer, chat_template: str | None) -> str:
    """A digest of what decides the token ids: vocabulary, merges, normaliser, specials, template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizer: the vocabulary and special tokens
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    h.update(json.dumps(tokenizer.all_special_tokens).encode("utf-8"))
    h.update(json.dumps([type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None),
                         getattr(tokenizer, "add_eos_token", None)]).encode())
    h.update((chat_template or "").encode("utf-8"))
    return "sha256:" + h.hexdigest()


class PairTokenizer:
    """Encodes `Pair`s for one tokenizer and one template mode."""

    def __init__(self, tokenizer, *, template: str = "auto", chat_template: str | None = None,
                 system_prompt: str | None = None):
        if template not in TEMPLATE_MODES:
            raise ConfigError(f"unknown --template '{template}'; valid: {', '.join(TEMPLATE_MODES)}")
        self.tok = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if template == "chat" and not self.chat_template:
            raise ConfigError("--template chat: the tokenizer has no chat template; pass "
                              "--chat-template FILE or use --template plain")
        self.use_chat = template == "chat" or (template == "auto" and bool(self.chat_template))
        if not self.use_chat:
            self.chat_template = None
        self.system_prompt = system_prompt
        self.eos_id = tokenizer.eos_token_id

    @property
    def mode(self) -> str:
        return "chat" if self.use_chat else "plain"

    def digest(self) -> str:
        return tokenizer_digest(self.tok, self.chat_template)

    def adds_system_prompt(self, pair: Pair) -> bool | None:
        """The rule for --system-prompt: it is added to conversations without a system message;
        a row's own system message is kept (None: no --system-prompt given)."""
        if not self.system_prompt:
            return None
        return not any(role == "system" for role, _ in pair.prompt)

    def _conversation(self, pair: Pair) -> list[dict]:
        messages = pair.messages
        if self.adds_system_prompt(pair):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def render(self, pair: Pair) -> tuple[str, str, str]:
        """(prompt text, chosen text, rejected text) such that prompt + response is the scored text."""
        messages = self._conversation(pair)
        if not self.use_chat:
            prompt = "\n\n".join(f"{PLAIN_ROLES.get(role, role.capitalize())}: {content}"
                                 for role, content in ((m["role"], m["content"]) for m in messages))
            return prompt + "\n\nAssistant:", " " + pair.chosen, " " + pair.rejected
        kwargs = {"tokenize": False, "chat_template": self.chat_template}
        try:
            prompt = self.tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            rendered = []
            for response in (pair.chosen, pair.rejected):
                full = self.tok.apply_chat_template(
                    messages + [{"role": "assistant", "content": response}], **kwargs)
                if not full.startswith(prompt):
                    raise DataError(
                        "the chat template renders the prompt differently when a response follows, "
                        "so the prompt/response boundary is ambiguous; use a template whose "
                        "generation prompt is a prefix of the full conversation, or --template plain",
                        reason="template_boundary", row=pair.source_index)
                rendered.append(full[len(prompt):])
        except DataError:
            raise
        except Exception as e:  # jinja errors: role order, unsupported roles, ...
            raise DataError(f"the chat template failed on this conversation: {e}",
                            reason="template_error", row=pair.source_index) from None
        return prompt, rendered[0], rendered[1]

    def encode_many(self, pairs: list[Pair]) -> list[PairTokens]:
        """Encode a list of pairs with batched tokenizer calls."""
        if not pairs:  # a shard whose rows were all dropped
            return []
        texts = [self.render(p) for p in pairs]
        prompts = self.tok([t[0] for t in texts], add_special_tokens=not self.use_chat)["input_ids"]
        responses = self.tok([r for t in texts for r in t[1:]], add_special_tokens=False)["input_ids"]
        eos = [self.eos_id] if not self.use_chat and self.eos_id is not None else []

        def ids(tokens: list[int], extra: list[int] = ()) -> np.ndarray:
            return np.asarray(list(tokens) + list(extra), dtype=np.int32)

        return [PairTokens(ids(prompt_ids), ids(responses[2 * i], eos), ids(responses[2 * i + 1], eos))
                for i, prompt_ids in enumerate(prompts)]


def apply_length_policy(enc: PairTokens, max_length: int, overlong: str) -> tuple[PairTokens | None, str | None]:
    """Keep, truncate or drop a pair; returns (encoded or None, drop reason or None)."""
    if enc.length <= max_length:
        return enc, None
    if overlong == "drop":
        return None, "overlong"
    room = max_length - len(enc.prompt_ids)
    if room < 1:
        return None, "prompt_too_long"
    return PairTokens(enc.prompt_ids, enc.chosen_ids[:room], enc.rejected_ids[:room], truncated=True), None
