"""What ends a completion: every end-of-sequence id the model declares, plus the user's.

A chat model usually ends its turn with a token other than the tokenizer's EOS
(Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`), and lists all of
them in generation_config.json's `eos_token_id` (an int or a list). transformers'
`generate` and mlx-lm stop at any of them; so do gft's rollouts, `gft generate` and
evaluation, on both backends.

The config key `stop` adds more: token ids, or strings. A string that is one token of the
vocabulary (`"<|im_end|>"`, often `"\\n\\n"`) becomes a stop id and ends the row inside the
decode loop; a longer string is matched on the decoded text after decoding, and the
completion is cut after the token that completes it (the row decoded on until a stop id
or the token limit: correct output, some wasted decoding).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from gft.errors import ConfigError


@dataclass(frozen=True)
class Stops:
    """ids: any of them ends a row (it is kept as the completion's last token).
    strings: text that ends a completion when it appears in the decoded output."""
    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()

    def ended(self, ids: Sequence[int], decode: Callable[[list[int]], str]) -> bool:
        """True when the completion ended by a stop (not cut at the token limit)."""
        if ids and ids[-1] in self.ids:
            return True
        return bool(self.strings) and any(s in decode(list(ids)) for s in self.strings)

    def cut(self, ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
        """ids up to and including the token that completes the first stop string."""
        if not self.strings or not ids or not any(s in decode(ids) for s in self.strings):
            return ids
        for n in range(1, len(ids) + 1):  # only rows that hold a stop string get here
            text = decode(ids[:n])
            if any(s in text for s in self.strings):
                return ids[:n]
        return ids


def generation_eos_ids(model_dir: str | Path) -> list[int]:
    """`eos_token_id` of the model's generation_config.json (int or list); [] if none."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []  # gft/modelfiles.py reports unreadable model files; stops need not
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def model_stops(tokenizer: Any, model_dir: str | Path, extra: Iterable[Any] = ()) -> Stops:
    """The tokenizer's EOS, every id in generation_config.json, and `extra` (the config's
    `stop`: ids, or strings; a one-token string becomes an id)."""
    if isinstance(extra, (str, int)):  # `stop: "</answer>"` means a list of one
        extra = [extra]
    ids = {i for i in [tokenizer.eos_token_id, *generation_eos_ids(model_dir)] if i is not None}
    strings: list[str] = []
    for value in extra:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise ConfigError(f"'stop': each entry must be a token id or a non-empty string, "
                              f"got {value!r}")
        if isinstance(value, int):
            if not 0 <= value < len(tokenizer):
                raise ConfigError(f"'stop': token id {value} is outside the vocabulary "
                                  f"(0..{len(tokenizer) - 1})")
            ids.add(value)
            continue
        token_ids = tokenizer(value, add_special_tokens=False).input_ids
        if len(token_ids) == 1:
            ids.add(token_ids[0])
        else:
            strings.append(value)
    return Stops(frozenset(ids), tuple(strings))


def apply_string_stops(rows: list[list[int]], stops: Stops,
                       decode: Callable[[list[int]], str]) -> list[list[int]]:
    """Each row cut after its first stop string (rows without one are unchanged)."""
    return [stops.cut(r, decode) for r in rows] if stops.strings else rows


