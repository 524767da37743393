"""Loading training and evaluation rows into `Example`s (rendering them: gft/prompts.py).

Accepted inputs (see `load_split`):
- a Hugging Face Hub id, `org/name` or `org/name:config`, through `datasets.load_dataset`
  (gft/hubdata.py), when no local path has that name;
- a `.jsonl` file, or a directory in mlx-lm layout (`train.jsonl`, `valid.jsonl`, `test.jsonl`);
- `{split}.json` (a JSON array of rows, JSON Lines as `datasets.Dataset.to_json` writes,
  or an object of columns as pandas writes one),
  `{split}.parquet` and `{split}.csv` files, or a single such file;
- CSV separated by commas, or by semicolons or tabs when its header line has no comma;
- any of these JSON, JSON Lines and CSV files gzip-compressed (`.jsonl.gz`, as
  `Dataset.to_json(..., compression="gzip")` writes and the Hugging Face hub serves), and
  extensions in any case (`.JSONL`);
- a directory as the Hugging Face hub stores a data set, with sharded splits
  (`data/train-00000-of-00002.parquet`, ...; read in order, every shard required);
- a directory written by `datasets.save_to_disk` (a DatasetDict, or one Dataset = "train").

A row holds `prompt` (a string or chat messages) or `messages` (a chat whose final
assistant turn is the demonstration), optional off-policy responses (`completion`,
`completions` or `responses`; each a string, or one assistant message in conversational
data), an optional `answer` (or the column named by `answer_column`), and any other
columns, which are passed to reward functions by name. These are TRL's prompt-only,
prompt-completion and `messages` dataset types, standard and conversational.

Every problem is a one-line `DataError` naming the file, the line (1-based for JSON Lines,
the 0-based row index for other formats) and the field. No row is ever dropped silently:
the only lines skipped are blank lines in JSON Lines files.

Files are read by gft/datafiles.py (formats, compression, line ends); this module finds a
split's file and validates the rows.
"""
from __future__ import annotations

import decimal
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gft.datafiles import (EXTENSIONS, Row, extension, import_datasets,
                           read_file, type_name)
from gft.errors import DataError, first_line
from gft.types import Example

# A requested split name -> the file stems and DatasetDict keys that may hold it.
# mlx-lm calls the validation split "valid"; Hugging Face calls it "validation".
_SPLIT_NAMES = {"valid": ("valid", "validation"), "validation": ("valid", "validation")}
_RESPONSE_FIELDS = ("completion", "completions", "responses")
# Keyword arguments of a reward call (gft/rewards.py) that a data column must not shadow.
_RESERVED_COLUMNS = ("prompts", "completion_ids", "trainer_state", "log_metric", "log_extra")
# The columns gft reads as text: a CSV reader keeps them as written (gft/datafiles.py).
_TEXT_COLUMNS = ("prompt", "messages", "text", *_RESPONSE_FIELDS, "answer")


@dataclass(frozen=True)
class Columns:
    """Which columns hold a row's parts: the config keys prompt_column, completion_column
    and answer_column, a data set's own names for them (MATH's problem and solution,
    GSM8K's question; mlx-lm's prompt_feature / completion_feature)."""
    prompt: str = "prompt"
    completion: str = "completion"
    answer: str = "answer"

    @property
    def text(self) -> tuple[str, ...]:
        """The columns gft reads as text (a CSV reader keeps them as written)."""
        return tuple(dict.fromkeys((*_TEXT_COLUMNS, self.prompt, self.completion,
                                    self.answer)))


# ---------------------------------------------------------------------------------------
# Public API


def load_split(path: str | os.PathLike, split: str = "train", *,
               required: bool = True, answer_column: str = "answer",
               prompt_column: str = "prompt",
               completion_column: str = "completion") -> list[Example]:
    """Load one split of a data set as a list of `Example`s.

    `path` is a data file (the split is then ignored) or a directory holding
    `{split}.jsonl|json|parquet|csv` or a `datasets.save_to_disk` copy. "validation" and
    "valid" name the same split. A missing split raises `DataError` when `required`,
    and gives `[]` otherwise. An existing but empty file is always an error.
    answer_column: the column holding the ground truth (e.g. TRL's "solution");
    prompt_column, completion_column: those holding the prompt and the response, when a
    data set names them otherwise (e.g. "problem", "solution").
    """
    columns = Columns(prompt_column, completion_column, answer_column)
    from gft.hubdata import hub_id, load_hub_splits
    from gft.runpaths import looks_local
    text = str(path)
    path = Path(path)
    if path.is_dir():
        return _load_from_directory(path, split, required, columns)
    if not looks_local(text) and hub_id(text) is not None:  # org/name on the Hugging Face Hub
        return _pick_split(load_hub_splits(text), split, required, text, "the data set",
                           columns)
    if extension(path) is None:
        if not path.exists():
            raise DataError("no such file or directory", path=str(path))
        raise DataError(f"unsupported data file type '{path.suffix}'; expected one of "
                        + ", ".join(EXTENSIONS), path=str(path))
    if not path.exists():
        if required:
            raise DataError("no such file", path=str(path))
        return []
    return _examples_from_rows(read_file(path, columns.text), str(path), columns)


def is_data_file(path: str | os.PathLike) -> bool:
    """A single data file (one split only), as opposed to a directory of splits."""
    return extension(Path(path)) is not None and not Path(path).is_dir()


def example_from_row(row: Any, *, path: str, line: int, columns: Columns = Columns(),
                     bool_answers: bool = False) -> Example:
    """Validate one decoded row and turn it into an `Example` (errors name path:line).
    bool_answers: a bool answer reads as "True"/"False" (a table's typed column, see
    _parse_answer), not refused.

    The TRL dataset types that carry a prompt are accepted, standard (strings) and
    conversational (chat messages) alike: prompt-only {"prompt"}, prompt-completion
    {"prompt", "completion"}, and {"messages"} (the final assistant turn is the
    demonstration)."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type_name(row)}",
                        path=path, line=line)

    def fail(field: str, message: str) -> DataError:
        return DataError(message, path=path, line=line, field=field)

    row = _under_gft_names(row, columns, fail)
    answer_column = columns.answer
    preference = [key for key in ("chosen", "rejected") if row.get(key) is not None]
    if preference:  # read as two extra columns, the row would train on its prompt alone
        raise fail(preference[0], "a preference row (TRL's chosen / rejected type, for DPO "
                                  "and reward-model trainers) is not a gft data type; give "
                                  "the preferred response as 'completion' instead")
    used = set()
    if row.get("prompt") is not None:
        prompt, demonstration = _parse_prompt(row["prompt"], fail), None
        used.add("prompt")
    elif row.get("messages") is not None:
        prompt, demonstration = _split_messages(row["messages"], fail)
        used.add("messages")
    elif row.get("text") is not None:
        raise fail("prompt", "missing: a row with only 'text' (TRL's language-modeling "
                             "type) has no prompt to answer; give 'prompt' and "
                             "'completion', or 'messages'")
    elif "prompt" in row or "messages" in row:
        raise fail("prompt" if "prompt" in row else "messages",
                   "missing: null (an empty cell); every row needs a prompt")
    else:
        raise fail("prompt", "missing: give 'prompt' (a string or chat messages) "
                             "or 'messages' (a chat)" + _what_it_has(row))
    _check_spaced_names(row, answer_column, fail)  # after the prompt: its own message
    responses, response_field = _parse_responses(row, fail)
    used.update({"answer", response_field} - {None})
    if demonstration is not None:
        responses = (demonstration, *responses)
    answer = _column_value(row, answer_column)
    if answer_column != "answer" and row.get("answer") is not None:
        if answer is None:  # it said "has both" of a row without the column
            raise fail(answer_column, f"missing: answer_column '{answer_column}' reads the "
                                      "ground truth from this column, and the row has "
                                      "'answer' instead; unset answer_column to use it")
        raise fail("answer", f"the row has both 'answer' and answer_column "
                             f"'{answer_column}'; keep one")
    reserved = sorted(set(row) & set(_RESERVED_COLUMNS))
    if reserved:
        raise fail(reserved[0], "this name is what reward functions receive the batch's "
                                f"{reserved[0]} under; rename the column")
    # The answer column keeps its own name too: TRL rewards read e.g. `solution`.
    columns = {key: value for key, value in row.items() if key not in used}
    return Example(prompt=prompt, responses=responses,
                   answer=_parse_answer(answer, fail, answer_column, bool_answers),
                   columns=columns, source=f"{path}:{line}")


def _under_gft_names(row: dict, columns: Columns, fail) -> dict:
    """The row with prompt_column's value under 'prompt' and completion_column's under
    'completion'. Their own columns stay too (reward functions read e.g. `solution`);
    a row that also holds gft's own name for the part is refused, not guessed between."""
    out = dict(row)
    for own, part, gfts in ((columns.prompt, "prompt", ("prompt",)),
                            (columns.completion, "completion", _RESPONSE_FIELDS)):
        if own == part:
            continue
        both = [key for key in gfts if row.get(key) is not None]
        if both:
            raise fail(both[0], f"the row has both '{both[0]}' and {part}_column '{own}'; "
                                "keep one")
        value = _column_value(row, own)
        if value is None and part == "prompt":
            raise fail(own, f"missing: prompt_column '{own}' reads the prompt from this "
                            "column" + _what_it_has(row))
        if value is not None:  # a row without a response is a prompt-only row
            out[part] = value
    return out


def _check_spaced_names(row: dict, answer_column: str, fail) -> None:
    """A column whose name is one of gft's but for spaces around it: a CSV header written
    'prompt, answer' gives a column ' answer', and the answer was lost in silence (None,
    and ' answer' passed to rewards as another column)."""
    for key in row:
        name = key.strip() if isinstance(key, str) else key
        if name != key and name in (*_TEXT_COLUMNS, answer_column):
            raise fail(key, f"a column named {key!r} (a space around '{name}'; a CSV header "
                            f"written with spaces after its commas?): name it '{name}'")


def _column_value(row: dict, column: str) -> Any:
    """row[column]; or, for a dotted name that is no column, the field inside an object
    column: verl's data keeps the ground truth in reward_model.ground_truth."""
    if column in row or "." not in column:
        return row.get(column)
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


# ---------------------------------------------------------------------------------------
# Finding and reading files


def _load_from_directory(directory: Path, split: str, required: bool,
                         columns: Columns = Columns()) -> list[Example]:
    """Find `split` in a directory of per-split files or a `save_to_disk` copy."""
    stems = _SPLIT_NAMES.get(split, (split,))
    found = _split_files(directory, stems) or _split_files(directory / "data", stems)
    if len(found) > 1:
        # Two candidates could hold different data: refuse to guess which one is meant.
        raise DataError(f"several files for split '{split}': "
                        + ", ".join(str(f[0].relative_to(directory)) + (" (shards)" if
                                    len(f) > 1 else "") for f in found) + "; keep one",
                        path=str(directory))
    if found:
        return [example for file in found[0] for example in
                _examples_from_rows(read_file(file, columns.text), str(file), columns)]
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        return _load_saved_dataset(directory, split, required, columns)
    if not required:
        return []
    expected = ", ".join(stem + ext for stem in stems for ext in EXTENSIONS)
    raise DataError(f"no '{split}' split: expected one of {expected} (or shards as the "
                    f"Hugging Face hub stores them, data/{stems[0]}-00000-of-00001.parquet, "
                    "or a datasets.save_to_disk directory)", path=str(directory))


# A shard as the Hugging Face hub names it: train-00000-of-00002.parquet
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})")


def _split_files(directory: Path, stems: tuple[str, ...]) -> list[list[Path]]:
    """The candidates for a split in `directory`: each one file ({stem}.jsonl, any case,
    as a case-insensitive file system would match), or one set of shards in order
    ({stem}-00000-of-00002.parquet, ...; all must be there)."""
    if not directory.is_dir():
        return []
    files: list[list[Path]] = []
    shards: dict[tuple[str, str, str], list[Path]] = {}
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:  # e.g. no permission to list it
        raise DataError(f"cannot list the directory: {exc.strerror or exc}",
                        path=str(directory)) from exc
    for entry in entries:
        kind = extension(entry)
        if kind is None or not entry.is_file():
            continue
        base = entry.name.lower()[:-len(kind)]
        shard = _SHARD.fullmatch(base)
        if base in stems:
            files.append([entry])
        elif shard and shard["stem"] in stems:
            shards.setdefault((shard["stem"], shard["count"], kind), []).append(entry)
    for (stem, count, kind), parts in shards.items():
        names = {part.name.lower() for part in parts}
        missing = [f"{stem}-{i:05d}-of-{count}{kind}" for i in range(int(count))
                   if f"{stem}-{i:05d}-of-{count}{kind}" not in names]
        if missing:
            raise DataError(f"shard {missing[0]} of {int(count)} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                            path=str(directory))
        files.append(parts)
    return files


def _load_saved_dataset(directory: Path, split: str, required: bool,
                        columns: Columns = Columns()) -> list[Example]:
    """A `save_to_disk` directory: a DatasetDict's split, or a lone Dataset as "train"."""
    datasets = import_datasets()
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:
        raise DataError(f"cannot load with datasets.load_from_disk: {type(exc).__name__}: "
                        f"{first_line(exc)}", path=str(directory)) from exc
    # A lone Dataset has no split names; treating it as every split would silently
    # evaluate on the training data, so it only answers for "train".
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return _pick_split(splits, split, required, str(directory), "the saved dataset",
                       columns, source=lambda name: str(directory / name))


def _pick_split(splits: dict[str, Any], split: str, required: bool, where: str, what: str,
                columns: Columns, source: Any = None) -> list[Example]:
    """The rows of `split` ("valid" and "validation" are one) of a {name: Dataset} dict,
    named in errors by source(name) (default: where[name])."""
    names = [stem for stem in _SPLIT_NAMES.get(split, (split,)) if stem in splits]
    if not names:
        if not required:
            return []
        raise DataError(f"no '{split}' split; {what} has: " + ", ".join(sorted(splits)),
                        path=where)
    name = names[0]
    return _examples_from_rows(enumerate(splits[name]),
                               source(name) if source else f"{where}[{name}]", columns)


def _examples_from_rows(rows: Iterable[Row], path: str,
                        columns: Columns = Columns()) -> list[Example]:
    """Validate every row; an empty file is an error (it is almost always a mistake)."""
    # CSV, Parquet and saved datasets come typed by pandas / Arrow: a True/False column
    # is bool there however the file writes it (quoting does not help in CSV)
    tabular = (extension(Path(path)) or "").removesuffix(".gz") not in (".json", ".jsonl")
    examples = [example_from_row(row, path=path, line=line, columns=columns,
                                 bool_answers=tabular)
                for line, row in rows]
    if not examples:
        raise DataError("the data file has no rows", path=path)
    return examples


# ---------------------------------------------------------------------------------------
# Validating fields


# Columns of other common data formats that hold the prompt, and what to do with them.
_FOREIGN_PROMPTS = {
    "conversations": "ShareGPT's 'conversations' hold from/value turns: convert them to "
                     "'messages' with role/content turns",
    "instruction": "Alpaca's instruction/input/output: give instruction and input as "
                   "'prompt', output as 'completion'",
    **{name: f"set prompt_column: {name}" for name in ("question", "problem", "query")},
}


def _what_it_has(row: dict) -> str:
    """'; the row has: ...' (names quoted, so that 'prompt ' from a CSV header with a
    space shows its space), and how to map a known foreign format's prompt column."""
    names = [repr(str(key)) for key in row]
    has = "; the row has " + (", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                              if names else "no columns")
    hints = [hint for key, hint in _FOREIGN_PROMPTS.items() if row.get(key) is not None]
    return has + (f" ({hints[0]})" if hints else "")


def _parse_prompt(value: Any, fail) -> str | list[dict[str, str]]:
    """A non-blank string, or a non-empty list of chat messages."""
    if isinstance(value, str):
        if not value.strip():
            raise fail("prompt", "empty prompt")
        return _check_text(value, "prompt", fail)
    if isinstance(value, list):
        return _check_prompt_end(_parse_chat(value, "prompt", fail), "prompt", fail)
    raise fail("prompt", f"must be a string or a list of chat messages, "
                         f"got {type_name(value)}")


def _split_messages(value: Any, fail) -> tuple[list[dict[str, str]], str | None]:
    """A `messages` chat -> (prompt messages, the final assistant reply or None)."""
    if not isinstance(value, list):
        raise fail("messages", f"must be a list of chat messages, got {type_name(value)}")
    messages = _parse_chat(value, "messages", fail)
    if messages[-1]["role"] != "assistant":
        return _check_prompt_end(messages, "messages", fail), None
    if len(messages) == 1:
        raise fail("messages", "holds only an assistant message; there is no prompt")
    _check_text_reply(messages[-1], f"messages[{len(messages) - 1}]", fail)
    return messages[:-1], messages[-1]["content"]


# the last prompt turns a response can follow, as TRL's apply_chat_template decides: a
# generation prompt after a user or tool turn, the assistant's own turn continued (a prefill)
_PROMPT_ENDS = ("user", "tool", "assistant")


def _check_prompt_end(messages: list[dict], field: str, fail) -> list[dict]:
    """A chat prompt ends where a response can follow (_PROMPT_ENDS). After a final system
    turn the template would open an assistant turn the system message never asked for,
    trained on as if it had; TRL raises there ("Invalid role in the last message")."""
    role = messages[-1]["role"]
    if role not in _PROMPT_ENDS:
        raise fail(f"{field}[{len(messages) - 1}].role",
                   f"the prompt ends with a '{role}' message; a response follows a user or "
                   "tool turn, or continues a final assistant turn (a prefill): end the "
                   "prompt with one, as TRL requires")
    return messages


def _parse_chat(messages: list, field: str, fail) -> list[dict[str, str]]:
    """Check each message is a dict with string 'role' and 'content'. A message with
    `tool_calls` (TRL's tool-calling rows) may have no content, or null: an assistant
    turn that only calls a tool has none, and `datasets` fills absent keys with null."""
    if not messages:
        raise fail(field, "empty list of chat messages")
    messages = list(messages)  # the row's own list stays as read
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise fail(where, f"a chat message must be an object with 'role' and "
                              f"'content', got {type_name(message)}")
        if isinstance(message.get("content"), list):  # typed parts: OpenAI's, TRL's
            message = {**message, "content": _text_parts(message["content"],
                                                         f"{where}.content", fail)}
            messages[index] = message
        for key in ("role", "content"):
            if key == "content" and message.get(key) is None and message.get("tool_calls"):
                continue
            if key not in message:
                raise fail(f"{where}.{key}", "missing")
            if not isinstance(message[key], str):
                raise fail(f"{where}.{key}",
                           f"must be a string, got {type_name(message[key])}")
            _check_text(message[key], f"{where}.{key}", fail)
    return [dict(message) for message in messages]


def _text_parts(parts: list, field: str, fail) -> str:
    """Content written as typed parts, [{"type": "text", "text": "..."}, ...] (OpenAI's
    and TRL's multimodal form; `datasets` adds the other part kinds' keys as null), as
    the one string a text model reads: the text parts joined, as chat templates that
    take parts render them. A part that is not text (an image, audio) is refused: a text
    model would train without it, on a prompt that no longer says what it asks."""
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"type '{kind}'" if kind else type_name(part)
            raise fail(f"{field}[{index}]", f"a content part of {what}; gft trains text "
                                            "models: give text parts "
                                            "({\"type\": \"text\", \"text\": ...}) or a string")
        texts.append(part["text"])
    return "".join(texts)


def _check_text_reply(message: dict, field: str, fail) -> None:
    """A response gft trains on and scores is text; a final turn that calls a tool is not
    (its call would be dropped, or the empty content trained on as the answer)."""
    if message.get("tool_calls"):
        raise fail(f"{field}.tool_calls", "the response (the final assistant message) calls a "
                                          "tool; gft trains on text responses: end the row "
                                          "with the assistant's text reply")


def _parse_responses(row: dict, fail) -> tuple[tuple[str, ...], str | None]:
    """Off-policy responses from whichever one response column is present. Each response
    is a string, or in conversational data one assistant message (TRL's conversational
    prompt-completion type: "completion": [{"role": "assistant", "content": ...}])."""
    present = [key for key in _RESPONSE_FIELDS if row.get(key) is not None]
    if len(present) > 1:
        raise fail(present[1], f"give only one of {', '.join(present)}")
    if not present:
        return (), None
    field, value = present[0], row[present[0]]
    if field == "completion":
        return (_response_text(value, field, fail),), field
    if not isinstance(value, list):
        # pandas' to_csv writes a list as its repr: a CSV cell holds text only
        written = " (a list written as text, as a CSV cell holds one: save the data as " \
                  "JSON Lines or Parquet, which keep lists)" \
            if isinstance(value, str) and value.lstrip().startswith("[") else ""
        raise fail(field, f"must be a list of responses, got {type_name(value)}{written}")
    return tuple(_response_text(item, f"{field}[{index}]", fail)
                 for index, item in enumerate(value)), field


def _response_text(value: Any, field: str, fail) -> str:
    """A response as text: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return _check_text(value, field, fail)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        got = type_name(value) if not isinstance(value, list) else "array of " + ", ".join(
            sorted({type_name(item) for item in value if not isinstance(item, dict)}))
        raise fail(field, f"must be a string or a list with one assistant message, got {got}")
    messages = _parse_chat(value, field, fail)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise fail(field, "a conversational response must be exactly one assistant "
                          f"message, got roles [{roles}]")
    _check_text_reply(messages[0], f"{field}[0]", fail)
    return messages[0]["content"]


def _parse_answer(value: Any, fail, field: str = "answer",
                  bool_text: bool = False) -> str | None:
    """Scalars become strings; NaN (a missing CSV cell read by pandas) means no answer.
    A bool is refused in JSON, where quoting it says which text is meant; a table's bool
    (pandas reads a CSV cell True as one, quoted or not) reads as "True" / "False"."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; str(True) is rarely wanted
        if bool_text:
            return str(value)
        raise fail(field, 'must be a string or a number, got bool (quote it: "true")')
    if isinstance(value, str):
        return _check_text(value, field, fail)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):  # JSON's Infinity literal, which json.loads accepts
            raise fail(field, f"must be a finite number, got {value}")
        # 42.0 (an integer column with gaps becomes float) should read as "42", and
        # 0.000015 as written, not as repr's "1.5e-05", which math_verify reads as 1.5e - 5.
        return str(int(value)) if value.is_integer() else _positional(value)
    nested = " (name a field inside it with a dot: " + ", ".join(
        f"{field}.{key}" for key in list(value)[:4]) + ")" if isinstance(value, dict) and value \
        else ""
    raise fail(field, f"must be a string or a number, got {type_name(value)}{nested}")


def _check_text(text: str, field: str, fail) -> str:
    """Text the tokenizer can encode. JSON may escape half of a UTF-16 surrogate pair
    ("\\ud83d" alone, from text cut in the middle of an emoji); json.loads accepts it, and
    the tokenizer then fails with a TypeError deep inside the run."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise fail(field, f"holds half of a UTF-16 surrogate pair (\\u{ord(text[exc.start]):04x} "
                          f"at character {exc.start}): the text was cut inside a character; "
                          "fix or remove it") from None
    return text


def _positional(value: float) -> str:
    """A float's shortest round-trip digits (repr's), written without an exponent."""
    return format(decimal.Decimal(repr(value)), "f")
