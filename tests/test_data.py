"""Tests for gft.data and the file readers under it (gft/datafiles.py, through
load_split): every accepted format, every error (naming file, line and field),
a property test that the JSONL loader only ever raises DataError, and prompt rendering."""
from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gft.data import example_from_row, load_split
from gft.prompts import render_prompt
from gft.errors import DataError, GFTError
from gft.types import Example

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def assert_error(excinfo, *parts: str) -> None:
    """The message is one line and names every part (file, line, field)."""
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


# ---------------------------------------------------------------------------------------
# JSONL rows


def test_jsonl_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "What is 1+1?", "completion": "2", "answer": 2, "level": 3},
        {"prompt": CHAT, "completions": ["4", "four"], "answer": "4"},
        {"prompt": "p", "responses": ["a"], "answer": 0.5},
        {"prompt": "p", "answer": None},
    ])
    first, second, third, fourth = load_split(path)
    assert first == Example("What is 1+1?", ("2",), "2", {"level": 3}, f"{path}:1")
    assert second.prompt == CHAT and second.responses == ("4", "four")
    assert second.answer == "4" and second.columns == {}
    assert third.responses == ("a",) and third.answer == "0.5"
    assert fourth.responses == () and fourth.answer is None


def test_jsonl_skips_blank_lines_and_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"prompt": "a"}\n   \n\n{"prompt": "b"}\n', encoding="utf-8")
    assert [e.source for e in load_split(path)] == [f"{path}:2", f"{path}:5"]


def test_jsonl_with_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [e.prompt for e in load_split(path)] == ["a", "b"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_cr_only_line_ends_are_line_breaks_counted_as_lines(tmp_path, suffix):
    """Classic Mac OS ends lines with a lone CR: the file read as one line failed with
    'malformed JSON: Extra data'. Mixed ends count as an editor counts them."""
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b'{"prompt": "a"}\r{"prompt": "b"}\r\n\r{"prompt": "c"}\n'
                     b'{"prompt": 5}\r')
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, f"d{suffix}:5", "'prompt'")
    path.write_bytes(b'{"prompt": "a"}\r{"prompt": "b"}\r\r{"prompt": "c"}\r')
    assert [e.source for e in load_split(path)] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    path.write_bytes(b'{"prompt": "a"}\r{"prompt": "\xe9"}\r')
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, f"d{suffix}:2", "UTF-8")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_document_named_jsonl_is_read_as_json(tmp_path, indent):
    """A JSON array (or one object) saved as .jsonl, as `datasets` reads it whatever the
    name; it failed with 'Expecting value' or 'a row must be a JSON object, got array'."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=indent))
    assert [(e.prompt, e.source) for e in load_split(path)] == [
        ("a", f"{path}:0"), ("b", f"{path}:1")]
    path.write_text(json.dumps({"prompt": "a", "answer": 1}, indent=indent))
    assert [(e.prompt, e.answer) for e in load_split(path)] == [("a", "1")]
    same = tmp_path / "d.json"  # and one object is one row under either name (review)
    same.write_text(json.dumps({"prompt": "a", "answer": 1}, indent=indent))
    assert [(e.prompt, e.answer) for e in load_split(same)] == [("a", "1")]


def test_pretty_printed_rows_in_jsonl_are_named_as_such(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + "\n".join(json.dumps({"prompt": p}, indent=2) for p in "ab"))
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl:2", "spans lines 2-4", "pretty-printed")
    path.write_text('[1]\n[2]\n')  # arrays, one per line: rows that are not objects
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl:1", "a row must be a JSON object, got array")


@pytest.mark.parametrize("name", ["d.JSONL", "d.Json", "d.jsonl.gz", "d.json.gz",
                                  "D.JSONL.GZ"])
def test_upper_case_and_gzip_file_names(tmp_path, name):
    """What Windows tools and the Hugging Face hub name files; `.gz` is what
    `Dataset.to_json(..., compression="gzip")` writes. Line numbers stay exact."""
    path = tmp_path / name
    data = b'{"prompt": "a", "answer": 1}\n\n{"prompt": "b"}\n'
    path.write_bytes(gzip.compress(data) if name.lower().endswith(".gz") else data)
    examples = load_split(path)
    assert [(e.prompt, e.answer, e.source) for e in examples] == [
        ("a", "1", f"{path}:1"), ("b", None, f"{path}:3")]
    bad = data + b'{"prompt": 5}\n'
    path.write_bytes(gzip.compress(bad) if name.lower().endswith(".gz") else bad)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, f"{name}:4", "'prompt'")


def test_gzip_split_files_in_a_directory(tmp_path):
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "t"}\n'))
    (tmp_path / "TEST.JSON").write_text(json.dumps([{"prompt": "e"}]))
    assert load_split(tmp_path)[0].prompt == "t"
    assert load_split(tmp_path, "test")[0].prompt == "e"
    (tmp_path / "train.jsonl").write_text('{"prompt": "other"}\n')
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path)
    assert_error(excinfo, "train.jsonl", "train.jsonl.gz", "keep one")


@pytest.mark.parametrize("content", [b'{"prompt": "a"}\n',  # not compressed at all
                                     gzip.compress(b'{"prompt": "a"}\n' * 50)[:-30]])
def test_a_damaged_gzip_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl.gz", "cannot decompress the gzip file")


def test_gzip_csv(tmp_path, datasets):
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"prompt,answer\nwhat?,7\n"))
    assert [(e.prompt, e.answer) for e in load_split(path)] == [("what?", "7")]


def test_messages_final_assistant_is_the_demonstration(tmp_path):
    chat = CHAT + [{"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": chat, "completions": ["five"], "answer": 4},
        {"messages": CHAT},
    ])
    with_demo, without = load_split(path)
    assert with_demo.prompt == CHAT and with_demo.responses == ("4", "five")
    assert without.prompt == CHAT and without.responses == ()


def test_prompt_wins_over_messages_which_stays_a_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "messages": CHAT}])
    (example,) = load_split(path)
    assert example.prompt == "p" and example.columns == {"messages": CHAT}


def test_integral_float_answer_reads_as_integer():
    example = example_from_row({"prompt": "p", "answer": 42.0}, path="f", line=1)
    assert example.answer == "42"


@pytest.mark.parametrize("value, text", [(0.000015, "0.000015"), (1e-07, "0.0000001"),
                                         (2.5, "2.5"), (-0.1, "-0.1"), (1e20, "100000000000000000000")])
def test_float_answer_reads_as_written_without_an_exponent(value, text):
    """A JSON (or CSV/Parquet) answer 0.000015 became repr's "1.5e-05": reward functions
    got another string than the data held, and math_verify reads 1.5e-05 as 1.5*e - 5."""
    example = example_from_row({"prompt": "p", "answer": value}, path="f", line=1)
    assert example.answer == text


# ---------------------------------------------------------------------------------------
# Directories and other formats


def test_mlx_directory_layout(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "v"}])
    assert load_split(tmp_path)[0].prompt == "t"
    assert load_split(tmp_path, "valid")[0].prompt == "v"
    assert load_split(tmp_path, "validation")[0].prompt == "v"
    assert load_split(tmp_path, "test", required=False) == []


def test_validation_file_name_is_an_alias(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", [{"prompt": "v"}])
    assert load_split(tmp_path, "valid")[0].prompt == "v"


def test_missing_split_names_directory_and_expected_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "t"}])
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path, "valid")
    assert_error(excinfo, str(tmp_path), "valid.jsonl", "validation.jsonl", "valid.parquet")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "nope.jsonl")
    assert_error(excinfo, "nope.jsonl")
    assert load_split(tmp_path / "nope.jsonl", required=False) == []
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "nowhere")
    assert_error(excinfo, "nowhere", "no such file or directory")


def test_a_directory_that_cannot_be_listed_is_a_data_error(tmp_path, monkeypatch):
    def refuse(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path)
    assert_error(excinfo, str(tmp_path), "cannot list the directory: Permission denied")


def test_two_files_for_one_split_is_ambiguous(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    write_jsonl(tmp_path / "train.json", [{"prompt": "b"}])
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path)
    assert_error(excinfo, "train.jsonl", "train.json")


def test_unsupported_extension(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "d.txt")
    assert_error(excinfo, "d.txt", ".jsonl")


def test_json_array_and_json_lines(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"prompt": "x", "answer": 1}, {"prompt": "y"}]))
    examples = load_split(array)
    assert [e.prompt for e in examples] == ["x", "y"]
    assert examples[1].source == f"{array}:1"  # 0-based row index for non-JSONL formats
    lines = write_jsonl(tmp_path / "l.json", [{"prompt": "x"}, {"prompt": "y"}])
    assert [e.source for e in load_split(lines)] == [f"{lines}:1", f"{lines}:2"]


def test_json_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"prompt": "x"},\n{"prompt": }\n]')
    with pytest.raises(DataError) as excinfo:
        load_split(bad)
    assert_error(excinfo, "bad.json:3", "malformed JSON")
    row = tmp_path / "row.json"
    row.write_text(json.dumps([{"prompt": "x"}, {"prompt": 5}]))
    with pytest.raises(DataError) as excinfo:
        load_split(row)
    assert_error(excinfo, "row.json:1", "'prompt'")
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(DataError) as excinfo:
        load_split(scalar)
    assert_error(excinfo, "scalar.json", "JSON array")


def test_json_object_of_columns(tmp_path):
    """A JSON object of columns, as `json.dump(df.to_dict("list"))` writes: one row per
    index (it was one row whose prompt was a list, 'got string' for prompt[0])."""
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"prompt": ["x", [{"role": "user", "content": "y"}]],
                                "answer": [1, None], "level": ["a", "b"]}))
    examples = load_split(path)
    assert [(e.prompt, e.answer, e.columns, e.source) for e in examples] == [
        ("x", "1", {"level": "a"}, f"{path}:0"),
        ([{"role": "user", "content": "y"}], None, {"level": "b"}, f"{path}:1")]
    # a row whose prompt is a chat is still one row, even with lists of the same length
    row = {"prompt": CHAT, "completions": ["4", "four"]}
    path.write_text(json.dumps(row))
    assert [e.responses for e in load_split(path)] == [("4", "four")]
    path.write_text(json.dumps({"prompt": ["x", "y"], "answer": [1]}))
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "cols.json", "field 'answer'", "(1 values)", "'prompt' (2 values)")


def test_pandas_to_json_default_orient_is_read(tmp_path):
    """`DataFrame.to_json(path)` writes orient="columns": {"prompt": {"0": ...}, ...}."""
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "train.json"
    pandas.DataFrame({"prompt": ["x", "y", "z"], "answer": [1, 2, None]}).to_json(path)
    assert [(e.prompt, e.answer) for e in load_split(path)] == [
        ("x", "1"), ("y", "2"), ("z", None)]
    pandas.DataFrame({"prompt": ["x"]}).to_json(path, orient="index", indent=1)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "train.json", "orient='records', lines=True")


@pytest.mark.parametrize("row, words", [
    ({"conversations": [{"from": "human", "value": "hi"}]}, ["ShareGPT", "'messages'"]),
    ({"instruction": "hi", "input": "", "output": "yo"}, ["Alpaca", "'completion'"]),
    ({"problem": "1+1", "solution": "2"}, ["set prompt_column: problem"]),
    ({"prompt ": "a space from a CSV header"}, ["the row has 'prompt '"]),
    ({"prompt": None, "answer": 1}, ["null (an empty cell)"]),
])
def test_a_missing_prompt_says_what_the_row_has(tmp_path, row, words):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl:1", "field 'prompt'", "missing", *words)


# ---------------------------------------------------------------------------------------
# Rows that load but that the run counts in a warning (gft/preflight.py)


def test_empty_dataset_responses_are_counted_before_training(tmp_path):
    """A completion "" (or spaces) is trained as EOS alone, teaching the model to stop at
    once; the run did so without a word."""
    import io
    from rich.console import Console
    from gft.config import build_config
    from gft.preflight import check_trainable
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "yes"}, {"prompt": "b", "completion": " \n"},
        {"prompt": "c", "completions": ["yes", ""]}, {"prompt": "d", "completion": ""}])
    rows = load_split(path)

    def said(**keys) -> str:
        out = io.StringIO()
        check_trainable(build_config({"model": "m", "data": str(path), **keys}), rows,
                        Console(file=out, width=400))
        return out.getvalue().strip()
    assert said(preset="sft") == (
        f"warning: 2 of 4 training rows have an empty (or whitespace-only) dataset response "
        f"(the first: {path}:2); trained on, it teaches the model to end its answer at once")
    assert said(preset="gft").startswith("warning: 3 of 4 training rows")  # K=4 takes row c's
    assert said(preset="grpo") == ""  # K=0: no dataset response is trained on


def test_a_system_column_beside_a_text_prompt_is_said(tmp_path):
    """mlx-lm-lora's GRPO rows {"prompt", "answer", "system"} put `system` in the prompt;
    gft passed it to rewards only, and the system prompt was dropped in silence."""
    import io
    from rich.console import Console
    from gft.config import build_config
    from gft.preflight import check_trainable
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2+2?", "answer": "4", "system": "Think first."},
        {"prompt": CHAT, "answer": "4", "system": "Think first."},
        {"prompt": "3+3?", "answer": "6"}])
    out = io.StringIO()
    check_trainable(build_config({"model": "m", "data": str(path), "preset": "grpo"}),
                    load_split(path), Console(file=out, width=400))
    said = out.getvalue().strip()
    assert said.startswith(f"warning: 1 of 3 training rows have a 'system' column beside a "
                           f"text prompt (the first: {path}:1)"), said
    assert "chat messages" in said and "\n" not in said


def test_groups_of_one_dataset_response_without_rollouts_are_said(tmp_path):
    """gft with num_rollouts: 0 on rows with one completion: every group is one response,
    no baseline, no update; the run trained nothing and said so only at the end."""
    import io
    from rich.console import Console
    from gft.config import build_config
    from gft.preflight import check_trainable
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "x"},
                                              {"prompt": "b", "completions": ["x", "y"]}])
    rows = load_split(path)
    cfg = build_config({"model": "m", "data": str(path), "num_rollouts": 0})
    out = io.StringIO()
    check_trainable(cfg, rows, Console(file=out, width=400))
    assert out.getvalue().strip() == (
        f"warning: 1 of 2 training rows have fewer than two dataset responses (the first: "
        f"{path}:1); preset 'gft' has num_rollouts=0 and advantage 'grpo', which compares the "
        "responses of a row's group: a group of one has no baseline, so they train nothing")
    with pytest.raises(DataError) as excinfo:
        check_trainable(cfg, rows[:1], Console(file=io.StringIO()))
    assert_error(excinfo, "no training row has two dataset responses", "num_rollouts >= 1")
    for keys in ({"preset": "sft"}, {"num_rollouts": 1}, {"advantage": "constant"}):
        out = io.StringIO()
        check_trainable(build_config({"model": "m", "data": str(path), "num_rollouts": 0,
                                      **keys}), rows[:1], Console(file=out))
        assert out.getvalue() == ""


def test_a_missing_answer_names_the_column_that_may_hold_it(tmp_path):
    """TRL's math data sets keep the ground truth in 'solution': the error said only that
    'answer' was missing."""
    from types import SimpleNamespace
    from gft.config import build_config
    from gft.preflight import check_answers
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1", "solution": "2"}])
    cfg = build_config({"model": "m", "data": str(path), "preset": "grpo"})
    with pytest.raises(DataError) as excinfo:
        check_answers(cfg, [SimpleNamespace(rows=load_split(path))])
    assert_error(excinfo, "d.jsonl:1", "field 'answer': missing; reward 'math' compares",
                 "this row has a 'solution' column: set answer_column: solution")
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "1+1", "solution": None}])
    with pytest.raises(DataError) as excinfo:
        check_answers(build_config({"model": "m", "data": str(path), "preset": "grpo",
                                    "answer_column": "solution"}),
                      [SimpleNamespace(rows=load_split(path, answer_column="solution"))])
    assert "set answer_column" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------
# Parquet, CSV and save_to_disk (the optional datasets package)

ROWS = [{"prompt": "x", "answer": 1, "completions": ["a", "b"]},
        {"prompt": "y", "answer": 2, "completions": ["c"]}]


@pytest.fixture
def datasets():
    """The optional `datasets` package (these tests skip without it)."""
    return pytest.importorskip("datasets")


def test_parquet_file_and_directory(tmp_path, datasets):
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "train.parquet"))
    for path in (tmp_path, tmp_path / "train.parquet"):
        examples = load_split(path)
        assert [(e.prompt, e.responses, e.answer) for e in examples] == [
            ("x", ("a", "b"), "1"), ("y", ("c",), "2")]
        assert examples[1].source == f"{tmp_path / 'train.parquet'}:1"


def test_hub_layout_with_sharded_splits(tmp_path, datasets):
    """A data set repository as the Hugging Face hub stores it (data/train-00000-of-00002
    .parquet, ...), which datasets.load_dataset(dir) reads; it was 'no train split'."""
    (tmp_path / "data").mkdir()
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    for name, rows in (("train-00000-of-00002", ROWS[:1]), ("train-00001-of-00002", ROWS[1:]),
                       ("test-00000-of-00001", ROWS[:1])):
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data" / f"{name}.parquet"))
    examples = load_split(tmp_path)
    expected = datasets.load_dataset(str(tmp_path), split="train")
    assert [e.prompt for e in examples] == expected["prompt"] == ["x", "y"]
    assert [e.source for e in examples] == [
        f"{tmp_path / 'data' / 'train-00000-of-00002.parquet'}:0",
        f"{tmp_path / 'data' / 'train-00001-of-00002.parquet'}:0"]
    assert [e.prompt for e in load_split(tmp_path, "test")] == ["x"]
    assert load_split(tmp_path, "valid", required=False) == []
    (tmp_path / "data" / "train-00001-of-00002.parquet").unlink()
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path)
    assert_error(excinfo, "shard train-00001-of-00002.parquet of 2 is missing")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "top"}])  # the top level comes first
    assert [e.prompt for e in load_split(tmp_path)] == ["top"]


def test_a_true_false_answer_column_of_a_table_reads_as_written(tmp_path, datasets):
    """pandas reads a CSV column of True/False as bool, quoted or not: the answer was
    refused with 'quote it', which a CSV cannot do. JSON's true is still refused."""
    path = tmp_path / "d.csv"
    path.write_text('prompt,answer\nis 2 even?,"True"\nis 3 even?,False\n')
    assert [e.answer for e in load_split(path)] == ["True", "False"]
    datasets.Dataset.from_list([{"prompt": "p", "answer": True}]).to_parquet(
        str(tmp_path / "d.parquet"))
    assert [e.answer for e in load_split(tmp_path / "d.parquet")] == ["True"]


def test_csv_file(tmp_path, datasets):
    path = tmp_path / "test.csv"
    path.write_text("prompt,answer,level\nwhat?,7,easy\nwhy?,,hard\n", encoding="utf-8")
    examples = load_split(tmp_path, "test")
    assert [(e.prompt, e.answer, e.columns) for e in examples] == [
        ("what?", "7", {"level": "easy"}), ("why?", None, {"level": "hard"})]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs(tmp_path, datasets, sep):
    """Excel writes ';' where the decimal mark is a comma: read with ',', the file was one
    column 'prompt;answer' and every row 'missing' its prompt."""
    path = tmp_path / "d.csv"
    path.write_text(f"\ufeffprompt{sep}answer\nwhat, then?{sep}1,5\nwhy?{sep}\n",
                    encoding="utf-8")
    assert [(e.prompt, e.answer) for e in load_split(path)] == [
        ("what, then?", "1,5"), ("why?", None)]


def test_csv_text_that_pandas_calls_missing_stays_text(tmp_path, datasets):
    """pandas reads 'NA', 'None', 'null', 'nan' cells as missing by default: a reward got
    None for the answer 'None' in silence (the built-in ones refused it as missing).
    Only an empty cell is missing."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nIs there one?,None\nWhich?,NA\nnull,nan\nEmpty?,\n")
    assert [(e.prompt, e.answer) for e in load_split(path)] == [
        ("Is there one?", "None"), ("Which?", "NA"), ("null", "nan"), ("Empty?", None)]


def test_csv_text_columns_stay_as_written(tmp_path, datasets):
    """A CSV has no types, but pandas reads a column of digits as numbers: a prompt
    "1234" was an int (refused), answers "007" and "1.50" became "7" and "1.5". gft's
    own columns (the answer_column too) stay text as written; other columns keep
    pandas' types, which reward functions get under TRL too (load_dataset("csv"))."""
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,solution,level\n1234,0042,007,3\n"
                    "12+7,19,1.50,4\n")
    examples = load_split(path, answer_column="solution")
    assert [(e.prompt, e.responses, e.answer) for e in examples] == [
        ("1234", ("0042",), "007"), ("12+7", ("19",), "1.50")]
    assert [e.columns for e in examples] == [{"solution": "007", "level": 3},
                                            {"solution": "1.50", "level": 4}]
    # as Excel writes it (a BOM, CRLF), gzip-compressed: the header is read the same way
    packed = tmp_path / "e.csv.gz"
    packed.write_bytes(gzip.compress(b"\xef\xbb\xbfprompt,answer\r\n1234,007\r\n"))
    assert [(e.prompt, e.answer) for e in load_split(packed)] == [("1234", "007")]


def test_large_csv_answer_column_of_digits_then_text(tmp_path, datasets):
    """pandas types a CSV 10,000 rows at a time: an answer column of digits that held
    text further down failed to load. A column that is not gft's names the cause."""
    path = tmp_path / "d.csv"
    rows = [f"q{i},{i:03d},{i}" for i in range(10_000)] + ["q,x,y"]
    path.write_text("prompt,answer,extra\n" + "\n".join(rows[:10_000]) + "\nq,x,1\n")
    examples = load_split(path)
    assert (examples[0].answer, examples[-1].answer, len(examples)) == ("000", "x", 10_001)
    path.write_text("prompt,answer,extra\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.csv", "'y'", "10,000 rows at a time")


def test_a_csv_header_with_spaces_after_its_commas_is_named(tmp_path, datasets):
    """'prompt, answer' (a hand-written header) gave a column ' answer': the answer was
    None in silence and ' answer' went to reward functions as another column."""
    path = tmp_path / "d.csv"
    path.write_text("prompt, answer\nWhat is 2+2?, 4\n")
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.csv:0", "' answer'", "name it 'answer'")


def test_a_list_column_written_to_csv_says_csv_holds_text(tmp_path, datasets):
    """pandas' to_csv writes a list as its repr "['a', 'b']": 'got string' alone left the
    user to guess why."""
    import pandas
    path = tmp_path / "d.csv"
    pandas.DataFrame({"prompt": ["q"], "completions": [["a", "b"]]}).to_csv(path, index=False)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.csv:0", "field 'completions'", "got string", "JSON Lines or Parquet")


def test_csv_non_utf8_names_line(tmp_path, datasets):
    path = tmp_path / "d.csv"
    path.write_bytes(b"prompt,answer\nok,1\nbad \xff,2\n")
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.csv:3", "UTF-8")


@pytest.mark.parametrize("content", ["prompt,answer\n", "", "\n"])
def test_csv_without_rows(tmp_path, datasets, content):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.csv", "no rows")


def test_parquet_without_rows(tmp_path, datasets):
    datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(tmp_path / "z.parquet"))
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "z.parquet")
    assert_error(excinfo, "z.parquet", "no rows")


def test_corrupt_parquet(tmp_path, datasets):
    (tmp_path / "bad.parquet").write_bytes(b"junk")
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "bad.parquet")
    assert_error(excinfo, "bad.parquet", "cannot read parquet")


def test_without_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    (tmp_path / "d.parquet").write_bytes(b"unused")
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "d.parquet")
    assert_error(excinfo, "pip install datasets")


def test_a_dotted_answer_column_reads_a_field_of_an_object_column(tmp_path, datasets):
    """verl's parquet keeps the ground truth in reward_model.ground_truth: answer_column:
    reward_model was refused as an object, and no name could reach the field."""
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list([
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "1+1?"}],
         "reward_model": {"style": "rule", "ground_truth": "2"}},
        {"data_source": "gsm8k", "prompt": [{"role": "user", "content": "2+2?"}],
         "reward_model": {"style": "rule", "ground_truth": None}}]).to_parquet(str(path))
    first, second = load_split(path, answer_column="reward_model.ground_truth")
    assert (first.answer, second.answer) == ("2", None)
    assert first.columns["reward_model"] == {"style": "rule", "ground_truth": "2"}
    with pytest.raises(DataError) as excinfo:
        load_split(path, answer_column="reward_model")
    assert_error(excinfo, "train.parquet:0", "field 'reward_model'", "got object",
                 "name a field inside it with a dot: reward_model.style, "
                 "reward_model.ground_truth")


def test_save_to_disk_dataset_dict(tmp_path, datasets):
    dataset = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": dataset, "validation": dataset.select([1])}) \
        .save_to_disk(str(tmp_path / "dd"))
    assert len(load_split(tmp_path / "dd")) == 2
    (valid,) = load_split(tmp_path / "dd", "valid")
    assert valid.prompt == "y" and valid.source.endswith("validation:0")
    assert load_split(tmp_path / "dd", "test", required=False) == []
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "dd", "test")
    assert_error(excinfo, "dd", "'test'", "train, validation")


def test_save_to_disk_single_dataset_is_train_only(tmp_path, datasets):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert len(load_split(tmp_path / "one")) == 2
    assert load_split(tmp_path / "one", "valid", required=False) == []


def test_save_to_disk_bad_row_names_split_and_index(tmp_path, datasets):
    rows = [{"prompt": "x"}, {"prompt": " "}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}) \
        .save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as excinfo:
        load_split(tmp_path / "dd")
    assert_error(excinfo, "train:1", "'prompt'", "empty")


# ---------------------------------------------------------------------------------------
# Row errors: each names the file, the line and the field


@pytest.mark.parametrize("row, field, words", [
    ({"answer": 1}, "prompt", "missing"),
    ({"prompt": None}, "prompt", "missing"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": " \t"}, "prompt", "empty"),
    ({"prompt": 7}, "prompt", "got number"),
    ({"prompt": {"role": "user"}}, "prompt", "got object"),
    ({"prompt": []}, "prompt", "empty list"),
    ({"prompt": ["hi"]}, "prompt[0]", "got string"),
    ({"prompt": [{"role": "user"}]}, "prompt[0].content", "missing"),
    ({"prompt": [{"content": "x"}]}, "prompt[0].role", "missing"),
    ({"prompt": [{"role": "user", "content": 3}]}, "prompt[0].content", "got number"),
    ({"messages": "hi"}, "messages", "got string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "no prompt"),
    ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role", "got number"),
    ({"prompt": "p", "completion": ["a"]}, "completion", "got array of string"),
    ({"prompt": "p", "completion": 3}, "completion", "got number"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "a"}]}, "completion",
     "roles [user]"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"}] * 2},
     "completion", "exactly one assistant message"),
    ({"prompt": "p", "completions": [[{"role": "tool", "content": "a"}]]}, "completions[0]",
     "exactly one assistant message"),
    ({"text": "a whole document"}, "prompt", "language-modeling"),
    ({"prompt": "p", "trainer_state": 3}, "trainer_state", "rename the column"),
    ({"prompt": "p", "completion_ids": [3]}, "completion_ids", "rename the column"),
    ({"prompt": "p", "completions": "a"}, "completions", "got string"),
    ({"prompt": "p", "completions": ["a", 2]}, "completions[1]", "got number"),
    ({"prompt": "p", "responses": [None]}, "responses[0]", "got null"),
    ({"prompt": "p", "completion": "a", "responses": ["b"]}, "responses", "only one"),
    ({"prompt": "p", "answer": [1]}, "answer", "got array"),
    ({"prompt": "p", "answer": {"x": 1}}, "answer", "got object"),
    ({"prompt": "p", "answer": True}, "answer", "bool"),
    ({"prompt": "p", "answer": float("-inf")}, "answer", "finite number, got -inf"),
    # JSON may escape half a surrogate pair; the tokenizer then crashed with a TypeError
    ({"prompt": "x\ud83d"}, "prompt", "half of a UTF-16 surrogate pair (\\ud83d at character 1)"),
    ({"prompt": "p", "completion": "\udfff"}, "completion", "surrogate"),
    ({"prompt": "p", "completions": ["a", "b\ud800"]}, "completions[1]", "surrogate"),
    ({"prompt": [{"role": "user", "content": "\ud800"}]}, "prompt[0].content", "surrogate"),
    ({"prompt": "p", "answer": "\ud800"}, "answer", "surrogate"),
])
def test_row_errors(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "rows.jsonl:2", f"field '{field}'", words)
    assert excinfo.value.line == 2 and excinfo.value.field == field


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a",}', "malformed JSON"),
    ('{"prompt": "a"', "malformed JSON"),
    ("not json", "malformed JSON"),
    ('["prompt"]', "got array"),
    ('"text"', "got string"),
    ("3", "got number"),
    ("null", "got null"),
    ("[" * 100_000, "malformed JSON"),  # recursion depth, reported not crashed
    ("1" * 5000, "malformed JSON"),     # Python's int-digit limit
])
def test_line_errors(tmp_path, line, words):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"prompt": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "lines.jsonl:3", words)


def test_malformed_json_includes_the_json_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a",}\n')
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl:1", "Expecting property name", "column")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "\xe9t\xe9"}\n')
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "d.jsonl:3", "UTF-8", "0xe9")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_utf16_file_is_named_as_such(tmp_path, suffix):
    """Windows PowerShell 5 writes UTF-16 with a byte-order mark; the error said only
    'not valid UTF-8 (byte 0xff)'."""
    path = tmp_path / f"d{suffix}"
    text = 'prompt,answer\nq,1\n' if suffix == ".csv" else '{"prompt": "a"}\n'
    path.write_text(text, encoding="utf-16")
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert str(excinfo.value) == (f"{path}:1: the file is UTF-16 (it starts with a UTF-16 "
                                  "byte-order mark); re-save it as UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_split(path)
    assert_error(excinfo, "empty.jsonl", "no rows")


# ---------------------------------------------------------------------------------------
# Property: the JSONL loader either loads or raises DataError, nothing else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8)
row_keys = st.sampled_from(["prompt", "messages", "completion", "completions",
                            "responses", "answer", "role", "content", "other"])
rows = st.dictionaries(row_keys | st.text(max_size=4), json_values, max_size=5)
chat_rows = st.fixed_dictionaries({"prompt": st.lists(st.fixed_dictionaries(
    {"role": json_values, "content": json_values}), max_size=2)})
# Mostly-valid rows, so that the property also exercises successful loads.
valid_rows = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1).filter(str.strip)},
    optional={"completions": st.lists(st.text(), max_size=2),
              "answer": st.none() | st.integers() | st.text(),
              "extra": json_values})
lines = st.one_of(valid_rows.map(json.dumps), valid_rows.map(json.dumps),
                  rows.map(json.dumps), chat_rows.map(json.dumps),
                  st.text().map(lambda t: t.encode("utf-8", "surrogatepass")
                                .decode("utf-8", "replace")),
                  st.binary(max_size=20).map(lambda b: b.decode("latin-1")))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(lines, st.binary(max_size=12)), max_size=6))
def test_jsonl_loader_only_raises_data_error(items):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "p.jsonl"
        path.write_bytes(b"\n".join(item if isinstance(item, bytes) else
                                    item.encode("utf-8") for item in items))
        try:
            examples = load_split(path)
        except DataError as exc:
            assert "\n" not in str(exc) and "p.jsonl" in str(exc)
        else:
            assert examples and all(isinstance(e, Example) for e in examples)


# ---------------------------------------------------------------------------------------
# Rendering prompts


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel expects)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = TEMPLATE
    yield tokenizer
    tokenizer.chat_template = None


def test_tiny_tokenizer_round_trips(tokenizer):
    ids = tokenizer("héllo").input_ids
    assert ids == list("héllo".encode("utf-8")) and tokenizer.decode(ids) == "héllo"


def test_render_chat_messages(chat_tokenizer):
    example = Example(prompt=CHAT, source="d.jsonl:4")
    assert render_prompt(example, chat_tokenizer) == \
        "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"


def test_a_prompt_ending_with_an_assistant_turn_is_continued(chat_tokenizer):
    """TRL's prefilled prompt: the response continues the final assistant message
    (continue_final_message). A generation prompt after it closed that turn and opened a
    new one, so the model answered something else."""
    prefilled = [*CHAT, {"role": "assistant", "content": "The answer is"}]
    assert render_prompt(Example(prompt=prefilled), chat_tokenizer) == \
        "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>The answer is"


def test_render_string_prompt(chat_tokenizer, tokenizer):
    example = Example(prompt="2+2?")
    assert render_prompt(example, chat_tokenizer) == "2+2?"  # auto: unwrapped
    assert render_prompt(example, chat_tokenizer, chat_template=False) == "2+2?"
    assert render_prompt(example, chat_tokenizer, chat_template=True) == \
        "<|user|>2+2?\n<|assistant|>"


def test_render_string_without_template_is_unchanged(tokenizer):
    assert render_prompt(Example(prompt="2+2?"), tokenizer, chat_template=True) == "2+2?"


def test_render_chat_without_template_is_an_error(tokenizer):
    with pytest.raises(DataError) as excinfo:
        render_prompt(Example(prompt=CHAT, source="d.jsonl:4"), tokenizer)
    assert_error(excinfo, "d.jsonl:4", "chat template")


def test_render_template_failure_is_a_data_error(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    try:
        with pytest.raises(DataError) as excinfo:
            render_prompt(Example(prompt=CHAT, source="d.jsonl:9"), tokenizer)
    finally:
        tokenizer.chat_template = None
    assert_error(excinfo, "d.jsonl:9", "roles must alternate")
    assert isinstance(excinfo.value, GFTError)


def test_chat_content_as_typed_text_parts_reads_as_its_text(tmp_path):
    """OpenAI's and TRL's typed content parts ({"type": "text", "text": ...}, with the
    other part kinds' keys as null, as `datasets` writes them) were refused ('must be a
    string, got array'); text parts are the message's text, joined; an image part, which
    a text model would silently train without, is refused naming it."""
    parts = lambda *texts: [{"type": "text", "text": t, "image": None} for t in texts]  # noqa: E731
    row = {"prompt": [{"role": "system", "content": parts("Be brief.")},
                      {"role": "user", "content": parts("What is ", "2+2?")}],
           "completion": [{"role": "assistant", "content": parts("4")}], "answer": "4"}
    original = json.loads(json.dumps(row))
    [example] = load_split(write_jsonl(tmp_path / "parts.jsonl", [row]))
    assert example.prompt == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 2+2?"}]
    assert example.responses == ("4",)
    assert row == original  # the row as read is left alone
    messages = {"messages": [{"role": "user", "content": parts("hi")},
                             {"role": "assistant", "content": parts("hello")}]}
    assert load_split(write_jsonl(tmp_path / "m.jsonl", [messages]))[0].responses == ("hello",)
    image = {"prompt": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                     *parts("What is this?")]}]}
    with pytest.raises(DataError, match=r"img.jsonl:1: field 'prompt\[0\]\.content\[0\]': a "
                                        r"content part of type 'image'; gft trains text"):
        load_split(write_jsonl(tmp_path / "img.jsonl", [image]))


def test_prompt_and_completion_columns_read_a_data_sets_own_names(tmp_path):
    from gft.errors import DataError
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "solution": "4", "level": 1}) + "\n")
    (ex,) = load_split(path, prompt_column="question", completion_column="solution",
                       answer_column="solution")
    assert (ex.prompt, ex.responses, ex.answer) == ("2+2?", ("4",), "4")
    # the columns keep their own names for reward functions, as answer_column's does
    assert ex.columns == {"question": "2+2?", "solution": "4", "level": 1}
    path.write_text(json.dumps({"question": "2+2?", "prompt": "3+3?"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt': the row has both "
                                        "'prompt' and prompt_column 'question'; keep one"):
        load_split(path, prompt_column="question")
    path.write_text(json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(DataError, match=r"field 'question': missing: prompt_column "
                                        "'question' reads the prompt from this column; "
                                        "the row has 'problem'"):
        load_split(path, prompt_column="question")
    # a CSV's prompt_column stays text as written ('007' is not the number 7)
    csv = tmp_path / "d.csv"
    csv.write_text("problem,answer\n007,7\n")
    (ex,) = load_split(csv, prompt_column="problem")
    assert ex.prompt == "007"


def test_a_system_prompt_opens_every_prompt_without_one():
    from gft.prompts import with_system_prompt
    from gft.types import Example
    rows = [Example("2+2?"), Example([{"role": "user", "content": "hi"}]),
            Example([{"role": "system", "content": "own"}, {"role": "user", "content": "x"}])]
    got = [ex.prompt for ex in with_system_prompt(rows, "Be brief.")]
    assert got == [[{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"}],
                   [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hi"}],
                   [{"role": "system", "content": "own"}, {"role": "user", "content": "x"}]]
    assert with_system_prompt(rows, None) is rows


def test_a_messages_column_beside_prompt_column_is_another_column(tmp_path):
    """NuminaMath-CoT holds problem, solution and messages: with prompt_column naming the
    prompt, 'messages' is passed to rewards like any column (as 'prompt' beside it is)."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "hi", "solution": "hello", "messages": chat}) + "\n")
    (ex,) = load_split(path, prompt_column="problem", completion_column="solution")
    assert (ex.prompt, ex.responses, ex.columns["messages"]) == ("hi", ("hello",), chat)
