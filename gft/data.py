"""Loading training and evaluation rows into `Example`s, and rendering prompts.

Accepted inputs (see `load_split`):
- a `.jsonl` file, or a directory in mlx-lm layout (`train.jsonl`, `valid.jsonl`, `test.jsonl`);
- `{split}.json` (a JSON array of rows, JSON Lines as `datasets.Dataset.to_json` writes,
  or an object of columns as pandas writes one),
  `{split}.parquet` and `{split}.csv` files, or a single such file;
- CSV separated by commas, or by semicolons or tabs when its header line has no comma;
- any of these JSON, JSON Lines and CSV files gzip-compressed (`.jsonl.gz`, as
  `Dataset.to_json(..., compression="gzip")` writes and the Hugging Face hub serves), and
  extensions in any case (`.JSONL`);
- a directory written by `datasets.save_to_disk` (a DatasetDict, or one Dataset = "train").

A row holds `prompt` (a string or chat messages) or `messages` (a chat whose final
assistant turn is the demonstration), optional off-policy responses (`completion`,
`completions` or `responses`; each a string, or one assistant message in conversational
data), an optional `answer` (or the column named by `answer_column`), and any other
columns, which are passed to reward functions by name. These are TRL's prompt-only,
prompt-completion and `messages` dataset types, standard and conversational.

A `.jsonl` file that is one JSON document (an array, or one object over several lines)
is read as a `.json` file, as `datasets` reads it. JSON Lines may end lines with LF, CRLF
or a lone CR (classic Mac OS): a raw CR cannot occur inside a JSON value, so each is a
line break, counted as an editor counts it.

Every problem is a one-line `DataError` naming the file, the line (1-based for JSON Lines,
the 0-based row index for other formats) and the field. No row is ever dropped silently:
the only lines skipped are blank lines in JSON Lines files.

JSON and JSON Lines are read with the standard library (exact line numbers in errors);
Parquet, CSV and `save_to_disk` directories need the optional `datasets` package, which is
imported only when such a file is read.
"""
from __future__ import annotations

import contextlib
import decimal
import gzip
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from gft.errors import DataError
from gft.types import Example

# A requested split name -> the file stems and DatasetDict keys that may hold it.
# mlx-lm calls the validation split "valid"; Hugging Face calls it "validation".
_SPLIT_NAMES = {"valid": ("valid", "validation"), "validation": ("valid", "validation")}
_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
_RESPONSE_FIELDS = ("completion", "completions", "responses")
# Keyword arguments of a reward call (gft/rewards.py) that a data column must not shadow.
_RESERVED_COLUMNS = ("prompts", "completion_ids", "trainer_state")
_Row = tuple[int, Any]  # (line number or row index, the decoded row)


# ---------------------------------------------------------------------------------------
# Public API


def load_split(path: str | os.PathLike, split: str = "train", *,
               required: bool = True, answer_column: str = "answer") -> list[Example]:
    """Load one split of a data set as a list of `Example`s.

    `path` is a data file (the split is then ignored) or a directory holding
    `{split}.jsonl|json|parquet|csv` or a `datasets.save_to_disk` copy. "validation" and
    "valid" name the same split. A missing split raises `DataError` when `required`,
    and gives `[]` otherwise. An existing but empty file is always an error.
    answer_column: the column holding the ground truth (e.g. TRL's "solution").
    """
    path = Path(path)
    if path.is_dir():
        return _load_from_directory(path, split, required, answer_column)
    if _extension(path) is None:
        if not path.exists():
            raise DataError("no such file or directory", path=str(path))
        raise DataError(f"unsupported data file type '{path.suffix}'; expected one of "
                        + ", ".join(_EXTENSIONS), path=str(path))
    if not path.exists():
        if required:
            raise DataError("no such file", path=str(path))
        return []
    return _examples_from_rows(_read_file(path), str(path), answer_column)


def is_data_file(path: str | os.PathLike) -> bool:
    """A single data file (one split only), as opposed to a directory of splits."""
    return _extension(Path(path)) is not None and not Path(path).is_dir()


def _extension(path: Path) -> str | None:
    """Which of _EXTENSIONS the file name ends with, in any case (".JSONL" from Windows
    tools, ".jsonl.gz"), lower-cased; None for another file type."""
    name = path.name.lower()
    matches = [ext for ext in _EXTENSIONS if name.endswith(ext) and len(name) > len(ext)]
    return max(matches, key=len) if matches else None


def example_from_row(row: Any, *, path: str, line: int,
                     answer_column: str = "answer") -> Example:
    """Validate one decoded row and turn it into an `Example` (errors name path:line).

    The TRL dataset types that carry a prompt are accepted, standard (strings) and
    conversational (chat messages) alike: prompt-only {"prompt"}, prompt-completion
    {"prompt", "completion"}, and {"messages"} (the final assistant turn is the
    demonstration)."""
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {_type_name(row)}",
                        path=path, line=line)

    def fail(field: str, message: str) -> DataError:
        return DataError(message, path=path, line=line, field=field)

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
                   answer=_parse_answer(answer, fail, answer_column),
                   columns=columns, source=f"{path}:{line}")


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


def render_prompt(example: Example, tokenizer: Any, *,
                  chat_template: bool | None = None) -> str:
    """The exact text the model is conditioned on for `example`.

    Chat messages always go through the tokenizer's chat template (with the generation
    prompt appended), so a tokenizer without one is an error. A string prompt is wrapped as
    a single user turn only when `chat_template` is True and the tokenizer has a template;
    None ("auto") and False leave string prompts unchanged, since plain-text data sets
    (and base models) are usually written for raw completion.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(example.prompt, str):
        if not (chat_template and has_template):
            return example.prompt
        messages = [{"role": "user", "content": example.prompt}]
    else:
        messages = example.prompt
    if not has_template:
        raise DataError("the prompt is a list of chat messages but the tokenizer has no "
                        "chat template; set one or give a string prompt",
                        path=example.source)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True,
                                             **_template_arguments(example))
    except DataError:
        raise
    except Exception as exc:  # a template may raise on data it does not accept
        raise DataError(f"the chat template failed: {type(exc).__name__}: "
                        f"{_one_line(exc)}", path=example.source) from exc
    if not isinstance(text, str):
        raise DataError(f"apply_chat_template returned {_type_name(text)}, not text",
                        path=example.source)
    return text


def _template_arguments(example: Example) -> dict[str, Any]:
    """What a row adds to its chat template, as TRL's SFTTrainer and mlx-lm's chat data
    read it: `tools` (the tool schemas a tool-calling prompt is written against; a JSON
    string as datasets often stores them) and `chat_template_kwargs` (e.g.
    {"enable_thinking": false}). Without them the prompt lacks what the data says."""
    def fail(field: str, message: str) -> DataError:
        return DataError(message, path=example.source, field=field)

    out: dict[str, Any] = {}
    tools = example.columns.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise fail("tools", "a string that is not JSON; give a list of tool schemas") \
                from None
    if tools:  # [] as None: some templates render tool boilerplate for an empty list
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise fail("tools", f"must be a list of tool schemas (objects), got "
                                f"{_type_name(tools)}")
        out["tools"] = tools
    kwargs = example.columns.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise fail("chat_template_kwargs", f"must be an object, got {_type_name(kwargs)}")
        out.update(kwargs)
    return out


# ---------------------------------------------------------------------------------------
# Finding and reading files


def _load_from_directory(directory: Path, split: str, required: bool,
                         answer_column: str = "answer") -> list[Example]:
    """Find `split` in a directory of per-split files or a `save_to_disk` copy."""
    stems = _SPLIT_NAMES.get(split, (split,))
    wanted = {stem + ext for stem in stems for ext in _EXTENSIONS}
    # matched in any case (train.JSONL), as a case-insensitive file system (macOS) would
    found = sorted(entry for entry in directory.iterdir()
                   if entry.name.lower() in wanted and entry.is_file())
    if len(found) > 1:
        # Two candidates could hold different data: refuse to guess which one is meant.
        raise DataError(f"several files for split '{split}': "
                        + ", ".join(p.name for p in found) + "; keep one", path=str(directory))
    if found:
        return _examples_from_rows(_read_file(found[0]), str(found[0]), answer_column)
    if (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file():
        return _load_saved_dataset(directory, split, stems, required, answer_column)
    if not required:
        return []
    expected = ", ".join(stem + ext for stem in stems for ext in _EXTENSIONS)
    raise DataError(f"no '{split}' split: expected one of {expected} "
                    "(or a datasets.save_to_disk directory)", path=str(directory))


def _read_file(path: Path) -> Iterator[_Row]:
    """Decoded rows of one data file, by extension."""
    extension = _extension(path).removesuffix(".gz")
    if extension == ".jsonl":
        return _read_jsonl(path)
    if extension == ".json":
        return _read_json(path)
    if extension == ".csv":
        # Checked here for exact line numbers; pandas reports neither well.
        text = _decode_utf8(_read_bytes(path), str(path))
        if not text.strip():
            return iter(())
        return _read_with_datasets(path, "csv", sep=_csv_delimiter(text))
    return _read_with_datasets(path, "parquet")


def _csv_delimiter(text: str) -> str:
    """',' unless the header line has none and has ';' (what Excel writes where the
    decimal mark is a comma) or a tab: read with commas, such a file was one column
    named 'prompt;answer' and every row lacked its prompt."""
    header = text.removeprefix("\ufeff").splitlines()[0]
    if "," in header:
        return ","
    return next((sep for sep in (";", "\t") if sep in header), ",")


def _open(path: Path) -> Any:
    """The file's bytes as a binary stream, decompressed when its name ends in .gz."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open(path) as handle, _gzip_errors(path):
        return handle.read()


@contextlib.contextmanager
def _gzip_errors(path: Path) -> Iterator[None]:
    """A damaged or truncated .gz file (or a plain file named .gz) as one DataError. No
    line: gzip decompresses ahead of the line being read, so it would be a guess."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"cannot decompress the gzip file: {_one_line(exc)}",
                        path=str(path)) from exc


def _lines(handle: Any) -> Iterator[bytes]:
    """The lines of a binary stream without their ends: LF, CRLF or a lone CR (the line
    end of classic Mac OS, which read as one long line failed with "Extra data")."""
    for raw in handle:
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        yield from raw.split(b"\r")


def _read_jsonl(path: Path) -> Iterator[_Row]:
    """(line number, object) for each non-blank line."""
    first = True
    with _open(path) as handle, _gzip_errors(path):
        for number, raw in enumerate(_lines(handle), start=1):
            text = _decode_utf8(raw, str(path), first_line=number)
            if number == 1:
                text = text.removeprefix("\ufeff")  # editors on Windows add a BOM
            if not text.strip():
                continue
            try:
                value = _parse_json(text, str(path), number)
            except DataError as error:
                rows = _json_document(path, number, error) if first else None
                if rows is None:
                    raise
                yield from rows
                return
            if first and isinstance(value, list):
                rows = _json_document(path, number, None)
                if rows is not None:
                    yield from rows
                    return
            first = False
            yield number, value


def _json_document(path: Path, first: int, error: DataError | None) -> Iterator[_Row] | None:
    """The rows of a .jsonl file that is one JSON document, read as a .json file is (as
    `datasets` reads such a file whatever its name): an array (rows by 0-based index),
    or one object over several lines; None: the file is read as JSON Lines. Several
    objects pretty-printed, which JSON Lines cannot be, are said as such (the first
    line alone failed with 'Expecting property name')."""
    text = _decode_utf8(_read_bytes(path), str(path)).removeprefix("\ufeff")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if error is not None and exc.msg == "Extra data" and exc.lineno > first:
            raise DataError(f"a JSON value spans lines {first}-{exc.lineno - 1} (pretty-printed "
                            "JSON?); JSON Lines holds one row per line (json.dumps(row) with "
                            "no indent)", path=str(path), line=first) from None
        return None
    except (ValueError, RecursionError):
        return None
    if isinstance(document, list):
        return iter(enumerate(document))
    if isinstance(document, dict) and error is not None:  # one object, pretty-printed
        table = _column_table(document, path)
        return iter(enumerate(table)) if table is not None else iter([(first, document)])
    return None


def _read_json(path: Path) -> Iterator[_Row]:
    """A JSON array of rows; or JSON Lines (what `Dataset.to_json` writes to `.json`)."""
    text = _decode_utf8(_read_bytes(path), str(path)).removeprefix("\ufeff")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # a second value after the first: one object per line
            return _read_jsonl(path)
        raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})",
                        path=str(path), line=exc.lineno) from exc
    except (ValueError, RecursionError) as exc:
        raise DataError(f"malformed JSON: {_one_line(exc)}", path=str(path)) from exc
    if isinstance(document, list):
        return iter(enumerate(document))
    if isinstance(document, dict):
        table = _column_table(document, path)
        if table is not None:
            return iter(enumerate(table))
        if len([s for s in text.splitlines() if s.strip()]) == 1:
            return iter([(1, document)])
    raise DataError("expected a JSON array of rows, one JSON object per line, or an object "
                    f"of columns, got {_type_name(document)} (pandas: write it with "
                    "to_json(path, orient='records', lines=True))", path=str(path))


def _column_table(document: dict, path: Path) -> list[dict] | None:
    """The rows of a JSON object of columns, as pandas reads one: {"prompt": [...],
    "answer": [...]} (`json.dump(df.to_dict("list"))`), or {"prompt": {"0": ..., "1":
    ...}, ...} (what `DataFrame.to_json(path)` writes by default, orient="columns"); a
    row each, in order. None when `document` is a row: its prompt is a string or chat
    messages (objects), never a list of prompts or an object."""
    key = next((k for k in ("prompt", "messages") if document.get(k) is not None), None)
    column = document.get(key)
    if isinstance(column, list) and column and not any(isinstance(v, dict) for v in column):
        labels: list[Any] = list(range(len(column)))
        kind = list
    elif isinstance(column, dict):
        labels, kind = list(column), dict
    else:
        return None
    for name, values in document.items():
        if not isinstance(values, kind) or len(values) != len(labels) \
                or (kind is dict and set(values) != set(labels)):
            shape = f"{len(values)} values" if isinstance(values, (list, dict)) \
                else _type_name(values)
            raise DataError(f"an object of columns whose column '{name}' ({shape}) does not "
                            f"match column '{key}' ({len(labels)} "
                            f"{'values' if kind is list else 'index labels'})",
                            path=str(path), field=name)
    return [{name: values[label] for name, values in document.items()} for label in labels]


def _parse_json(text: str, path: str, line: int) -> Any:
    """json.loads with every failure (syntax, huge numbers, deep nesting) as a DataError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})",
                        path=path, line=line) from exc
    except (ValueError, RecursionError) as exc:
        raise DataError(f"malformed JSON: {_one_line(exc)}", path=path, line=line) from exc


def _decode_utf8(data: bytes, path: str, first_line: int = 1) -> str:
    """Decode UTF-8, reporting the line and byte of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if first_line == 1 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            # what Windows PowerShell 5's `>` and Out-File write: name it, not byte 0xff
            raise DataError("the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                            "re-save it as UTF-8", path=path, line=1) from exc
        before = data[:exc.start]  # line ends as _lines counts them: LF, CRLF, CR
        line = first_line + before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n")
        raise DataError(f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save the "
                        "file as UTF-8", path=path, line=line) from exc


def _import_datasets() -> Any:
    """The optional `datasets` package, or a DataError saying how to install it."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("reading Parquet, CSV or save_to_disk data needs the 'datasets' "
                        "package: pip install datasets") from exc
    return datasets


def _read_with_datasets(path: Path, kind: str, **options: Any) -> Iterator[_Row]:
    """Rows of a Parquet or CSV file, via `datasets`, with their 0-based index."""
    datasets = _import_datasets()
    reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_csv
    try:
        dataset = reader(str(path), **options)
    except Exception as exc:  # corrupt file, bad CSV quoting, ...: report, never crash
        if "corresponds to no data" in str(exc):  # how datasets says "zero rows"
            return iter(())
        raise DataError(f"cannot read {kind}: {type(exc).__name__}: {_one_line(exc)}",
                        path=str(path)) from exc
    return iter(enumerate(dataset))


def _load_saved_dataset(directory: Path, split: str, stems: tuple[str, ...],
                        required: bool, answer_column: str = "answer") -> list[Example]:
    """A `save_to_disk` directory: a DatasetDict's split, or a lone Dataset as "train"."""
    datasets = _import_datasets()
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:
        raise DataError(f"cannot load with datasets.load_from_disk: {type(exc).__name__}: "
                        f"{_one_line(exc)}", path=str(directory)) from exc
    # A lone Dataset has no split names; treating it as every split would silently
    # evaluate on the training data, so it only answers for "train".
    splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    names = [stem for stem in stems if stem in splits]
    if not names:
        if not required:
            return []
        raise DataError(f"no '{split}' split; the saved dataset has: "
                        + ", ".join(sorted(splits)), path=str(directory))
    source = str(directory / names[0])
    return _examples_from_rows(enumerate(splits[names[0]]), source, answer_column)


def _examples_from_rows(rows: Iterable[_Row], path: str,
                        answer_column: str = "answer") -> list[Example]:
    """Validate every row; an empty file is an error (it is almost always a mistake)."""
    examples = [example_from_row(row, path=path, line=line, answer_column=answer_column)
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
    **{name: f"rename '{name}' to 'prompt'" for name in ("question", "problem", "query")},
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
        return _parse_chat(value, "prompt", fail)
    raise fail("prompt", f"must be a string or a list of chat messages, "
                         f"got {_type_name(value)}")


def _split_messages(value: Any, fail) -> tuple[list[dict[str, str]], str | None]:
    """A `messages` chat -> (prompt messages, the final assistant reply or None)."""
    if not isinstance(value, list):
        raise fail("messages", f"must be a list of chat messages, got {_type_name(value)}")
    messages = _parse_chat(value, "messages", fail)
    if messages[-1]["role"] != "assistant":
        return messages, None
    if len(messages) == 1:
        raise fail("messages", "holds only an assistant message; there is no prompt")
    _check_text_reply(messages[-1], f"messages[{len(messages) - 1}]", fail)
    return messages[:-1], messages[-1]["content"]


def _parse_chat(messages: list, field: str, fail) -> list[dict[str, str]]:
    """Check each message is a dict with string 'role' and 'content'. A message with
    `tool_calls` (TRL's tool-calling rows) may have no content, or null: an assistant
    turn that only calls a tool has none, and `datasets` fills absent keys with null."""
    if not messages:
        raise fail(field, "empty list of chat messages")
    for index, message in enumerate(messages):
        where = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise fail(where, f"a chat message must be an object with 'role' and "
                              f"'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if key == "content" and message.get(key) is None and message.get("tool_calls"):
                continue
            if key not in message:
                raise fail(f"{where}.{key}", "missing")
            if not isinstance(message[key], str):
                raise fail(f"{where}.{key}",
                           f"must be a string, got {_type_name(message[key])}")
            _check_text(message[key], f"{where}.{key}", fail)
    return [dict(message) for message in messages]


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
        raise fail(field, f"must be a list of responses, got {_type_name(value)}")
    return tuple(_response_text(item, f"{field}[{index}]", fail)
                 for index, item in enumerate(value)), field


def _response_text(value: Any, field: str, fail) -> str:
    """A response as text: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return _check_text(value, field, fail)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        got = _type_name(value) if not isinstance(value, list) else "array of " + ", ".join(
            sorted({_type_name(item) for item in value if not isinstance(item, dict)}))
        raise fail(field, f"must be a string or a list with one assistant message, got {got}")
    messages = _parse_chat(value, field, fail)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise fail(field, "a conversational response must be exactly one assistant "
                          f"message, got roles [{roles}]")
    _check_text_reply(messages[0], f"{field}[0]", fail)
    return messages[0]["content"]


def _parse_answer(value: Any, fail, field: str = "answer") -> str | None:
    """Scalars become strings; NaN (a missing CSV cell read by pandas) means no answer."""
    if value is None:
        return None
    if isinstance(value, bool):  # bool is an int subclass; str(True) is rarely wanted
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
    raise fail(field, f"must be a string or a number, got {_type_name(value)}{nested}")


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


def _type_name(value: Any) -> str:
    """JSON-flavoured type names for messages about JSON data."""
    names = {dict: "object", list: "array", str: "string", bool: "bool",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(exc: BaseException) -> str:
    """The first line of an exception message (errors here are one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
