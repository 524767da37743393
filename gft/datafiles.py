"""Reading data files into decoded rows: (line number or row index, row) pairs.

gft/data.py finds a split's file and validates the rows; this module only reads files.
JSON and JSON Lines are read with the standard library, for exact line numbers in errors
(JSON Lines: 1-based lines, ended by LF, CRLF or a lone CR; other formats: the 0-based
row index); Parquet and CSV go through the optional `datasets` package, imported only
when such a file is read. `.gz` files are decompressed with the standard library. Every
failure is a one-line `DataError` naming the file (and the line where there is one).

A `.jsonl` file that is one JSON document (an array, or one object over several lines)
is read as a `.json` file, as `datasets` reads it. A raw CR cannot occur inside a JSON
value, so a lone CR (classic Mac OS) is a line break, counted as an editor counts it.
"""
from __future__ import annotations

import contextlib
import gzip
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from gft.errors import DataError, first_line

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
Row = tuple[int, Any]  # (line number or row index, the decoded row)


def extension(path: Path) -> str | None:
    """Which of EXTENSIONS the file name ends with, in any case (".JSONL" from Windows
    tools, ".jsonl.gz"), lower-cased; None for another file type."""
    name = path.name.lower()
    matches = [ext for ext in EXTENSIONS if name.endswith(ext) and len(name) > len(ext)]
    return max(matches, key=len) if matches else None


def read_file(path: Path, text_columns: Iterable[str] = ()) -> Iterator[Row]:
    """Decoded rows of one data file, by extension. text_columns: the CSV columns read as
    text exactly as written (see _csv_converters); the others are typed as `datasets`
    types them."""
    kind = extension(path).removesuffix(".gz")
    if kind == ".jsonl":
        return _read_jsonl(path)
    if kind == ".json":
        return _read_json(path)
    if kind == ".csv":
        # Checked here for exact line numbers; pandas reports neither well.
        text = _decode_utf8(_read_bytes(path), str(path))
        if not text.strip():
            return iter(())
        # only an empty cell is missing: pandas' default NA strings would turn an answer
        # "NA", "None" or "null" (and a prompt "nan") into a missing value in silence
        sep = _csv_delimiter(text)
        return _read_with_datasets(path, "csv", sep=sep, keep_default_na=False,
                                   na_values=[""],
                                   converters=_csv_converters(path, sep, text_columns))
    return _read_with_datasets(path, "parquet")


def _csv_delimiter(text: str) -> str:
    """',' unless the header line has none and has ';' (what Excel writes where the
    decimal mark is a comma) or a tab: read with commas, such a file was one column
    named 'prompt;answer' and every row lacked its prompt."""
    header = text.removeprefix("\ufeff").splitlines()[0]
    if "," in header:
        return ","
    return next((sep for sep in (";", "\t") if sep in header), ",")


def _csv_converters(path: Path, sep: str, text_columns: Iterable[str]) -> dict[str, Any]:
    """`str` for each of text_columns the header has: a CSV has no types, and pandas reads
    a column of digits as numbers, so a prompt "1234" was an int (refused) and an answer
    "007" or "1.50" lost its text ("7", "1.5"). Read through a converter a cell stays as
    written; an empty one is still missing. It also keeps such a column one type over a
    large file, which pandas types chunk by chunk (digits in the first 10,000 rows, then
    text, failed). Other columns keep pandas' types, which reward functions get under
    TRL too (`load_dataset("csv")`)."""
    import pandas  # datasets' own dependency; reads the header row alone, from the file
    try:           # (a copy of a large file's text would cost memory)
        header = pandas.read_csv(path, sep=sep, nrows=0, encoding="utf-8-sig").columns
    except Exception:  # a malformed header: datasets' read below reports it
        return {}
    wanted = set(text_columns)
    return {name: str for name in header if name in wanted}


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
        raise DataError(f"cannot decompress the gzip file: {first_line(exc)}",
                        path=str(path)) from exc


def _lines(handle: Any) -> Iterator[bytes]:
    """The lines of a binary stream without their ends: LF, CRLF or a lone CR (the line
    end of classic Mac OS, which read as one long line failed with "Extra data")."""
    for raw in handle:
        raw = raw.removesuffix(b"\n").removesuffix(b"\r")
        yield from raw.split(b"\r")


def _read_jsonl(path: Path) -> Iterator[Row]:
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


def _json_document(path: Path, first: int, error: DataError | None) -> Iterator[Row] | None:
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


def _read_json(path: Path) -> Iterator[Row]:
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
        raise DataError(f"malformed JSON: {first_line(exc)}", path=str(path)) from exc
    if isinstance(document, list):
        return iter(enumerate(document))
    if isinstance(document, dict):
        table = _column_table(document, path)
        if table is not None:
            return iter(enumerate(table))
        if len([s for s in text.splitlines() if s.strip()]) == 1 or \
                any(k in document for k in ("prompt", "messages")):
            return iter([(1, document)])  # one row, on one line or pretty-printed, as .jsonl
    raise DataError("expected a JSON array of rows, one JSON object per line, or an object "
                    f"of columns, got {type_name(document)} (pandas: write it with "
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
                else type_name(values)
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
        raise DataError(f"malformed JSON: {first_line(exc)}", path=path, line=line) from exc


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


def import_datasets(what: str = "reading Parquet, CSV or save_to_disk data",
                    path: str | None = None) -> Any:
    """The optional `datasets` package, or a DataError saying what needs it and how to
    install it."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{what} needs the 'datasets' package: pip install datasets",
                        path=path) from exc
    return datasets


def _read_with_datasets(path: Path, kind: str, **options: Any) -> Iterator[Row]:
    """Rows of a Parquet or CSV file, via `datasets`, with their 0-based index."""
    datasets = import_datasets()
    reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_csv
    try:
        dataset = reader(str(path), **options)
    except Exception as exc:  # corrupt file, bad CSV quoting, ...: report, never crash
        if "corresponds to no data" in str(exc):  # how datasets says "zero rows"
            return iter(())
        cause = _root_cause(exc)
        hint = " (pandas types a CSV 10,000 rows at a time, and a column read as numbers " \
               "holds text further down; JSON Lines or Parquet keep a column's type)" \
            if kind == "csv" and "Failed to parse" in str(cause) else ""
        raise DataError(f"cannot read {kind}: {type(cause).__name__}: {first_line(cause)}"
                        f"{hint}", path=str(path)) from exc
    return iter(enumerate(dataset))


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: datasets wraps what failed in "An error occurred while
    generating the dataset", which names nothing."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def type_name(value: Any) -> str:
    """JSON-flavoured type names for messages about JSON data."""
    names = {dict: "object", list: "array", str: "string", bool: "bool",
             int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
