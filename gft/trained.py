"""What a gft run's model folder (final/, checkpoints/step-N/, copied out of its run or
not) says about using it as it was trained: `gft generate` and `gft eval` read it here.

Each such folder holds gft.json (gft/checkpoint.py's model_record): the prompt format,
the run's extra stops, how its evaluation scored. Folders written before gft.json held a
key say it through a step checkpoint's trainer_state.json, or a run's config.yaml beside
final/. Only what the weights were trained for travels in gft.json; where the run's data
lies is this machine's business, read from the run directory around the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from gft.checkpoint import STATE_FILE

_UNKNOWN = object()


def _trained_setting(model_dir: str, key: str) -> Any:
    """A gft model's setting `key` as its run trained: its gft.json (written into every
    checkpoint and final/, so a folder copied out of its run still says it); for folders
    written before gft.json held the key, a step checkpoint's trainer_state.json config
    or, for a run's final/, the run's config.yaml beside it. _UNKNOWN when none says (not
    a gft run's model, or unreadable)."""
    from gft.checkpoint import read_model_record, read_state
    from gft.errors import ModelError
    path = Path(model_dir)
    record = read_model_record(path)
    if record is not None and key in record:
        return record[key]
    try:
        if (path / STATE_FILE).is_file():
            return read_state(path)["config"].get(key)
        run_config = path.parent / "config.yaml"
        if path.name == "final" and run_config.is_file():
            config = yaml.safe_load(run_config.read_text(encoding="utf-8"))
            if isinstance(config, dict):
                return config.get(key)
    except (ModelError, OSError, ValueError, yaml.YAMLError):
        pass  # not readable as a gft run: treat it as any model directory
    return _UNKNOWN


def trained_settings(model_dir: str, keys: Sequence[str]) -> dict[str, Any]:
    """Those of `keys` a gft model's run set (_trained_setting), unset ones left out."""
    values = {key: _trained_setting(model_dir, key) for key in keys}
    return {k: v for k, v in values.items() if v is not _UNKNOWN and v is not None}


def trained_chat_template(model_dir: str) -> bool | None:
    """The chat_template setting a gft model was trained with (_trained_setting); None
    when unknown (not a gft run's model, or unreadable)."""
    value = _trained_setting(model_dir, "chat_template")
    return None if value is _UNKNOWN else bool(value)


def trained_system_prompt(model_dir: str) -> str | None:
    """The system message a gft model's prompts opened with (config key system_prompt);
    None when its run set none, or it is not a gft run's model."""
    value = _trained_setting(model_dir, "system_prompt")
    return value if isinstance(value, str) and value.strip() else None


def system_prompt_for(model_dir: str, given: str | None, chat_template: bool | None
                      ) -> str | None:
    """The system message `gft generate` / `gft eval` open prompts with: --system-prompt
    ("" for none), else the one a gft run's model was trained with, so that it is prompted
    as it learned. A system message is a chat turn: with --no-chat-template the trained
    one is left out, and one given is refused."""
    from gft.errors import ConfigError
    if chat_template is False:
        if given:
            raise ConfigError("--system-prompt is a chat turn, rendered with the chat "
                              "template: drop --no-chat-template, or the system prompt")
        return None
    if given is not None:
        return given or None
    return trained_system_prompt(model_dir)


def trained_stop(model_dir: str) -> list:
    """The extra stops (config key `stop`) a gft model's run ended rollouts and
    evaluation at; [] for any other model. `gft generate` and `gft eval` end there too,
    else the trained model's output runs on past where training cut it."""
    from gft.checkpoint import MODEL_RECORD, read_model_record, stop_list
    from gft.errors import ModelError
    value = _trained_setting(model_dir, "stop")
    try:
        values = [] if value is _UNKNOWN else stop_list(value)
    except TypeError:
        values = [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, str)) or v == ""]
    if bad:  # a hand-edited record: name it, as the config key's check would the config
        where = MODEL_RECORD if "stop" in (read_model_record(model_dir) or {}) else \
            "its run's config"
        raise ModelError(f"{model_dir}: 'stop' in {where}: each entry must be a token id or "
                         f"a non-empty string, got {bad[0]!r}")
    return values


def generate_chat_template(model_dir: str, tokenizer) -> bool:
    """`gft generate`'s default: render prompts as the model was trained when it is a gft
    run's model (trained_chat_template; unset = plain string prompts), else use the
    tokenizer's chat template where it has one, as mlx-lm's generate does. final/ counts:
    it is what README's `gft generate runs/x/final` samples from, and the default job
    trains on plain prompts with a tokenizer that has a template."""
    trained = trained_chat_template(model_dir)
    if trained is not None:
        return trained
    return bool(getattr(tokenizer, "chat_template", None))


# `gft eval` options and the run settings they default to on a gft run's model
EVAL_DEFAULTS = {"rewards": "rewards", "answer_column": "answer_column",
                 "prompt_column": "prompt_column", "completion_column": "completion_column",
                 "max_new_tokens": "max_response_tokens"}


def eval_defaults(model_dir: str, left: set[str], asked: dict[str, Any]) -> tuple[dict, list]:
    """The `gft eval` options in `left` (not given: at their defaults) that take the run's
    own value, so that the accuracy is the one its in-training evaluation reported
    rather than one scored by another reward or cut at another length, in silence; and
    a phrase for each, for the note saying so. `asked`: every option's value now
    (rewards as _reward_option parsed it)."""
    run = trained_settings(model_dir, list(EVAL_DEFAULTS.values()))
    taken: dict[str, Any] = {}
    ran = run.get("rewards")
    names = isinstance(ran, list) and all(isinstance(r, str) for r in ran)
    if "rewards" in left and ran is not None and ran not in (asked["rewards"], ",".join(
            asked["rewards"])):
        taken["rewards"] = ran
    for key in ("answer_column", "prompt_column", "completion_column"):
        column = run.get(key)
        if key in left and isinstance(column, str) and column != asked[key]:
            taken[key] = column
    longest = run.get("max_response_tokens")
    if "max_new_tokens" in left and isinstance(longest, int) and not isinstance(longest, bool) \
            and longest > 0 and longest != asked["max_new_tokens"]:
        taken["max_new_tokens"] = longest
    said = {"rewards": lambda v: f"--rewards {','.join(v) if names else v}",
            "answer_column": lambda v: f"--answer-column {v}",
            "prompt_column": lambda v: f"--prompt-column {v}",
            "completion_column": lambda v: f"--completion-column {v}",
            "max_new_tokens": lambda v: f"--max-new-tokens {v} (its max_response_tokens)"}
    return taken, [said[k](v) for k, v in taken.items()]


def held_out_data(model_dir: str, split: str | None) -> tuple[str, str] | None:
    """(data, split) the run of a gft model in its run directory held out for its
    in-training evaluation, found on this machine as gft/run.py held_out_rows found it:
    its eval_data (a file; a directory's or Hub data set's eval_split, else valid; or a
    split name of its data), else its data directory's or Hub data set's eval_split, else
    valid. `split`: the one asked for (None: the run's). None when the folder is not in a
    gft run directory or the run used the embedded task (the caller's default).
    A ConfigError naming the run when its held-out rows cannot be named: its data is not
    on this machine, is one file, or has no held-out split (the run held out rows by
    eval_holdout, which gft eval cannot pick out again, or evaluated nothing)."""
    from gft.checkpoint import run_dir_of
    from gft.data import is_data_file
    from gft.errors import ConfigError
    from gft.runpaths import looks_local
    path = Path(model_dir)
    if not (path / STATE_FILE).is_file() and not (path.name == "final" and (
            path.parent / "config.yaml").is_file()):
        return None  # copied out of its run: where its data lay is unknown here
    column_keys = ("answer_column", "prompt_column", "completion_column")
    run = trained_settings(model_dir, ["data", "eval_data", "eval_split", *column_keys])
    columns = {k: run[k] for k in column_keys if isinstance(run.get(k), str)}
    run_split = run.get("eval_split") if isinstance(run.get("eval_split"), str) else "test"
    ask = "pass --data FILE, or --data DIR --split NAME, with held-out rows"

    def local(key: str, value: str) -> Path:
        found = Path(value).expanduser()
        if not found.is_absolute():  # stored relative: inside the run directory
            found = run_dir_of(path) / found
        if not found.exists():
            raise ConfigError(f"{model_dir}: its run evaluated on {key} {value}, which is not "
                              f"on this machine; {ask}")
        return found

    def pick(data: str, key: str) -> tuple[str, str]:
        if split is not None or is_data_file(data):
            return data, split or run_split  # a file is one split; a split asked is used
        from gft.data import load_split
        for name in dict.fromkeys([run_split, "valid"]):
            if load_split(data, name, required=False, **columns):  # read as the run did
                return data, name
        raise ConfigError(f"{model_dir}: its run's {key} {data} has no held-out split "
                          f"('{run_split}' or 'valid'): the run evaluated on rows "
                          f"eval_holdout set aside from training, or on none; {ask}")

    eval_data, data = run.get("eval_data"), run.get("data")
    data = data if isinstance(data, str) and data else None
    if isinstance(eval_data, str) and eval_data:
        if not looks_local(eval_data) and "/" not in eval_data and data is not None \
                and not is_data_file(data):  # a split name of the run's data directory
            found = str(local("data", data)) if looks_local(data) else data  # or Hub set
            return found, split or eval_data
        if not looks_local(eval_data):
            return pick(eval_data, "eval_data")  # a Hub data set: its own splits
        return pick(str(local("eval_data", eval_data)), "eval_data")
    if data is None:
        return None
    if not looks_local(data):
        return pick(data, "data")
    found = local("data", data)
    if not found.is_dir():
        raise ConfigError(f"{model_dir}: its run trained on one file, {data}, which "
                          "has no held-out split (rows its eval_holdout set aside are not "
                          f"picked out again here); {ask}")
    return pick(str(found), "data")


def sampling_note(model_dir: str) -> str | None:
    """One line when the model's generation_config.json asks for sampling (do_sample, as
    transformers' generate() and vLLM follow it): `gft generate` decodes greedily unless
    --temperature is given, as mlx-lm's generate does, so the user is told which options
    sample as the file says. None when the file asks for nothing of the kind."""
    import json
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("do_sample") is not True:
        return None
    def number(key: str, low: float, high: float) -> float | None:
        value = config.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return value if ok and low < value <= high else None
    temperature, top_p = number("temperature", 0, float("inf")), number("top_p", 0, 1)
    top_k = number("top_k", 0, float("inf"))
    said, options = [], [f"--temperature {temperature or 1.0:g}"]
    if temperature is not None:
        said.append(f"temperature {temperature:g}")
    if top_p is not None:
        said.append(f"top_p {top_p:g}")
        options += [f"--top-p {top_p:g}"] * (top_p < 1)
    if top_k is not None:
        said.append(f"top_k {top_k:g}")
    penalty = number("repetition_penalty", 0, float("inf"))
    if penalty == 1:
        penalty = None
    if penalty is not None:
        said.append(f"repetition_penalty {penalty:g}")
    dropped = [k for k, v in (("top_k", top_k), ("repetition_penalty", penalty)) if v is not None]
    skipped = (f" ({' and '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} not applied: "
               "gft samples with temperature and top_p)") if dropped else ""
    return (f"note: {path} samples (do_sample{': ' + ', '.join(said) if said else ''}), as "
            "transformers' generate() would; gft generate decodes greedily unless told, as "
            f"mlx-lm's does: add {' '.join(options)} to sample as it says{skipped}")
