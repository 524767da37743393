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

A saved model says the same to other tools: every checkpoint's generation_config.json lists
the run's one-token stops after the model's own eos ids (write_generation_eos), so
transformers' `generate` and mlx-lm end where the run's rollouts ended. gft.json records
which ids those were (STOP_EOS_KEY), so that a later run from that folder starts from the
model's own ids again and keeps only the stops its own config names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from gft.errors import ConfigError


# gft.json's key for the ids a run added to generation_config.json's eos_token_id
STOP_EOS_KEY = "stop_eos_ids"


@dataclass(frozen=True)
class Stops:
    """ids: any of them ends a row (it is kept as the completion's last token).
    strings: text that ends a completion when it appears in the decoded output.
    eos: the model's own eos ids, as its generation_config.json lists them (else the
    tokenizer's EOS); added: the config's one-token stops that are not among them. A saved
    checkpoint's generation_config.json lists eos + added."""
    ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    eos: tuple[int, ...] = ()
    added: tuple[int, ...] = ()

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
    """`eos_token_id` (int or list) of the model's generation_config.json, else of its
    config.json (a folder without a generation config, or one naming no eos: mlx-lm's
    load reads config.json's then, and transformers builds its generation config from
    config.json when the file is missing); [] if neither names one."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue  # gft/modelfiles.py reports unreadable model files; stops need not
        values = value if isinstance(value, list) else [value]
        ids = [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
        if ids:
            return ids
    return []


def own_eos_ids(model_dir: str | Path) -> list[int]:
    """generation_config.json's eos ids less those a gft run added for its `stop` (its
    gft.json's STOP_EOS_KEY): the ids the model itself declares."""
    added = _recorded_stop_ids(model_dir)
    return [i for i in generation_eos_ids(model_dir) if i not in added]


def _recorded_stop_ids(model_dir: str | Path) -> set[int]:
    path = Path(model_dir) / "gft.json"  # gft/checkpoint.py MODEL_RECORD
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get(STOP_EOS_KEY)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return set()
    values = value if isinstance(value, list) else []
    return {v for v in values if isinstance(v, int) and not isinstance(v, bool)}


def model_stops(tokenizer: Any, model_dir: str | Path, extra: Iterable[Any] = ()) -> Stops:
    """The tokenizer's EOS, the model's own eos ids (own_eos_ids), and `extra` (the
    config's `stop`: ids, or strings; a one-token string becomes an id)."""
    if isinstance(extra, (str, int)):  # `stop: "</answer>"` means a list of one
        extra = [extra]
    eos = own_eos_ids(model_dir) or [i for i in [tokenizer.eos_token_id] if i is not None]
    ids = {i for i in [tokenizer.eos_token_id, *eos] if i is not None}
    own = set(ids)
    strings: list[str] = []
    added: list[int] = []  # in the order `stop` gives them
    for value in extra:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or value == "":
            raise ConfigError(f"'stop': each entry must be a token id or a non-empty string, "
                              f"got {value!r}")
        if isinstance(value, int):
            if not 0 <= value < len(tokenizer):
                raise ConfigError(f"'stop': token id {value} is outside the vocabulary "
                                  f"(0..{len(tokenizer) - 1})")
            added.append(value)
            continue
        token_ids = tokenizer(value, add_special_tokens=False).input_ids
        if len(token_ids) == 1:
            added.append(token_ids[0])
        else:
            strings.append(value)
    added = [i for i in dict.fromkeys(added) if i not in own]
    return Stops(frozenset(ids | set(added)), tuple(strings), tuple(dict.fromkeys(eos)),
                 tuple(added))


def write_generation_eos(model_dir: str | Path, stops: Stops) -> bool:
    """List the run's one-token stops (stops.added) after the model's own eos ids in
    model_dir's generation_config.json, the only stops transformers' `generate` and
    mlx-lm's `load` read from a folder; every other field stays as the file had it.
    A folder without the file (a LoRA adapter: those tools read the base's) is left
    alone. True when the file is there (and now says so)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        return False  # not ours to repair: gft/modelfiles.py names such a file on load
    want = list(dict.fromkeys([*stops.eos, *stops.added]))
    have = config.get("eos_token_id")
    if not want or have == want or (have == want[0] and len(want) == 1) or (
            have is None and not stops.added):  # nothing of the run's to say
        return True
    config["eos_token_id"] = want[0] if len(want) == 1 else want
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def unsaved_stops_note(stops: Stops) -> str | None:
    """One line for the run's log when `stop` holds strings longer than one token:
    generation_config.json holds token ids only, so only gft reads them from the saved
    folder (its gft.json)."""
    if not stops.strings:
        return None
    named = ", ".join(repr(s) for s in stops.strings)
    return (f"note: stop {named}: more than one token, which generation_config.json cannot "
            "hold; gft generate and gft eval end there (the checkpoints' gft.json), "
            "transformers' generate only with stop_strings=[...] and tokenizer= given")


def apply_string_stops(rows: list[list[int]], stops: Stops,
                       decode: Callable[[list[int]], str]) -> list[list[int]]:
    """Each row cut after its first stop string (rows without one are unchanged)."""
    return [stops.cut(r, decode) for r in rows] if stops.strings else rows


