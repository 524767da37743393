"""Data sets named by their Hugging Face Hub id: `data: trl-lib/DeepMath-103K`, or with a
configuration, `data: openai/gsm8k:main` (TRL's dataset_name and dataset_config in one).

A `data` value that is no local path and reads as a hub id ('name' or 'org/name') is
loaded with `datasets.load_dataset`, which downloads it once into the Hugging Face cache
(HF_HOME, HF_DATASETS_CACHE) and reads it from there afterwards, offline too
(HF_DATASETS_OFFLINE=1). Its splits are the data set's own: "train" trains, and
eval_split (default "test"; "valid" and "validation" are one) evaluates, as with a local
directory. Rows go through the same validation as a local file's, named
`org/name[split]:row`.

The run stores the id as given (gft/runpaths.py), so a copied run resumes from the same
data set on another machine. Deliberate choice: no column mapping here; a data set whose
columns are not prompt / completion / messages (with answer_column for the ground truth)
is refused row by row as a local file would be: convert it with `datasets` first.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gft.errors import DataError, first_line

# org/name as the Hub spells repository ids, then an optional :configuration
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)"
                     r"(?::(?P<config>[\w.-]+))?$")


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repository id, configuration or None) when `text` reads as a Hub data set id,
    else None. The caller has checked that it is no local path."""
    match = _HUB_ID.match(text)
    if match is None or _file_name(match["repo"]):
        return None
    return match["repo"], match["config"]


# file types no hub id ends with, besides the data files gft reads (gft/datafiles.py)
_OTHER_FILES = (".tsv", ".txt", ".arrow", ".zip", ".tar", ".xz", ".bz2", ".zst", ".xlsx")


def _file_name(text: str) -> bool:
    """Named like a file (`train.JSONL`, `rows.tsv`): a missing local file, never asked
    of the hub (a typo would cost a network round trip and a confusing error)."""
    from gft.datafiles import extension
    return extension(Path(text)) is not None or text.lower().endswith(_OTHER_FILES)


def load_hub_splits(text: str) -> dict[str, Any]:
    """The data set's splits ({name: datasets.Dataset}) from the Hub or its cache; a
    failure (not found, gated, offline without a cached copy) is one DataError line."""
    repo, config = hub_id(text) or (text, None)
    from gft.datafiles import import_datasets
    datasets = import_datasets("not a local path; reading it from the Hugging Face Hub", text)
    try:
        loaded = datasets.load_dataset(repo, config)
    except Exception as exc:  # not found, gated, no network, bad config: one line
        first = first_line(exc)
        raise DataError(f"no such file or directory, and the Hugging Face Hub did not give "
                        f"a data set of that id: {type(exc).__name__}: {first}",
                        path=text) from None
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {"train": loaded}
