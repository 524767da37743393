"""Paths a run directory keeps, stored so that the directory can move.

A run directory is copied to another machine or folder as a whole (`cp -r runs/demo ...`),
then resumed, evaluated or sampled from any working directory. The paths it stores
(config.yaml's and trainer_state.json's `model` and `data`, an adapter's base model) are
therefore written as:
- relative to the run directory when they lie inside it, as `./base-model` (the
  embedded default's base-model/ and task/, a model or data set kept in the run);
- absolute when they are local paths elsewhere (the working directory may change);
- as given when they are not local paths (a hub id stays a hub id).
On resume a relative path is looked up in the run directory first, then (runs written
before this layout) in the working directory; a path found nowhere is one line naming
the key and the option that supplies it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from gft.errors import ConfigError
from gft.verifiers import BUILTIN_REWARDS

RUN_PATH_KEYS = {"model": "--model", "data": "--data"}
# gft/checkpoint.py writes a directory X atomically as .X.tmp-PID, then renames it
_ATOMIC_TMP = re.compile(r"^\.(.+)\.tmp-\d+$")


def looks_local(text: str) -> bool:
    """A path on this machine rather than a hub id ('org/name'): it exists, or it is
    written as a path (absolute, ./ ../ ~, or more than one '/')."""
    return (Path(text).expanduser().exists() or text.startswith((".", "/", "~", "\\"))
            or text.count("/") > 1)


def stored_path(value: str | None, run_dir: Path) -> str | None:
    """How a run directory stores a path it uses (see the module docstring)."""
    if not value or not looks_local(value):
        return value
    path = Path(value).expanduser().resolve()
    root = Path(run_dir).resolve()
    if path == root or root in path.parents:  # "./": a path, never read as a hub id
        return "./" + path.relative_to(root).as_posix()
    return str(path)


def stored_config(config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A config dict (gft.config.to_dict) as the run directory stores it: besides model
    and data, eval_data when it is a path (not a split name) and the files of
    'file.py:function' rewards are stored the same way."""
    def store(path: str) -> str:
        return stored_path(path, run_dir) or path

    out = {**config, **{k: stored_path(config.get(k), run_dir) for k in RUN_PATH_KEYS}}
    out["eval_data"] = stored_path(config.get("eval_data"), run_dir)
    return _with_reward_files(out, store)


def resolve_stored_extras(config: dict[str, Any], run_dir: Path,
                          source: str | None = None) -> dict[str, Any]:
    """eval_data and reward files as stored_config wrote them, found from any working
    directory: a relative one inside the run directory when it is there, else as given
    (a split name, or a run written before these were stored). With `source` (where they
    were read), one stored as a path (absolute, or './' inside the run) that is not on
    this machine is a ConfigError naming the key and how to give its new place."""
    def found(key: str, how: str) -> Any:
        def look(path: str) -> str:
            inside = _inside(path, run_dir)
            if inside or source is None or Path(path).expanduser().exists() \
                    or not (Path(path).is_absolute() or path.startswith("./")):
                return inside or path
            raise ConfigError(f"{source}: {key} '{path}' is not on this machine; pass "
                              f"{how} with --set {key}=...")
        return look

    out = dict(config)
    if out.get("eval_data"):
        out["eval_data"] = found("eval_data", "its new path")(out["eval_data"])
    return _with_reward_files(out, found("rewards", "the rewards with the file's new path"))


def _with_reward_files(config: dict[str, Any], change) -> dict[str, Any]:
    """`rewards` with their file paths passed through change() (a stage cannot set its
    own: gft.config refuses it, the run scores once)."""
    out = dict(config)
    if out.get("rewards") is not None:
        out["rewards"] = map_reward_files(out["rewards"], change)
    return out


def _inside(value: str, run_dir: Path) -> str | None:
    """A relative stored path found inside the run directory (where stored_path put it),
    or None."""
    path = Path(value).expanduser()
    inside = Path(run_dir) / path
    return str(inside) if not path.is_absolute() and inside.exists() else None


def resolve_stored(value: str | None, run_dir: Path, key: str, source: str) -> str | None:
    """The path a stored `key` names on this machine, from any working directory."""
    if not value:
        return value
    found = _inside(value, run_dir)
    if found:
        return found
    path = Path(value).expanduser()
    if path.exists() or not looks_local(value):  # a hub id: the backend resolves it
        return value
    where = str(path) if path.is_absolute() else f"{Path(run_dir) / path} or {path}"
    raise ConfigError(f"{source}: {key} '{value}' is not on this machine (looked for {where}); "
                      f"pass it with {RUN_PATH_KEYS[key]} PATH")


def base_for_adapter(base: str | None, adapter_dir: Path) -> str | None:
    """adapter_config.json's base_model_name_or_path, stored as config.yaml stores a path
    (stored_path): a hub id as given; a base inside the adapter's run directory relative
    to the adapter (so the run can move; `adapter_base` reads it back); any other local
    path absolute. A path relative to the working directory would name the base from
    that one directory only: `gft generate runs/x/final` from anywhere else, or peft from
    there, would not find it.
    Only a run's final/ and checkpoints/step-N/ are inside a run: an adapter written
    elsewhere (gft convert) has no run directory around it."""
    if not base or not looks_local(base):
        return base
    adapter_dir = Path(adapter_dir).resolve()
    path = Path(base).expanduser().resolve()
    name = _ATOMIC_TMP.sub(r"\1", adapter_dir.name)  # final/ is written as .final.tmp-PID/
    run_dir = (adapter_dir.parent.parent if adapter_dir.parent.name == "checkpoints"
               else adapter_dir.parent if name == "final" else None)
    if run_dir is not None and run_dir in path.parents:
        return os.path.relpath(path, adapter_dir)
    return str(path)


def adapter_base(stored: str, adapter_dir: Path) -> str:
    """The base model an adapter's base_model_name_or_path names, from any working
    directory: relative to the adapter directory first, then as given."""
    inside = Path(adapter_dir) / stored
    if not Path(stored).is_absolute() and looks_local(stored) and inside.exists():
        return os.path.normpath(inside)
    return stored


def moved_adapter_config(text: str, source: Path, target: Path) -> str:
    """adapter_config.json copied from `source` to `target` (final/ from a step
    checkpoint, one level up): a base stored relative to the adapter is re-stored
    relative to the new place."""
    config = json.loads(text)
    stored = config.get("base_model_name_or_path")
    if stored and not Path(stored).is_absolute() and stored.startswith("."):
        base = adapter_base(stored, source)
        config["base_model_name_or_path"] = base_for_adapter(base, target)
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def base_as_stored(adapter_dir: str | Path, base: str | None) -> str | None:
    """The base to load under a resumed LoRA checkpoint: the adapter's own
    base_model_name_or_path (what the user typed, a hub id, a path relative to the
    adapter) when it names the same model as `base`, the run's resolved path. So a resume
    does not rewrite the saved adapters' base to an absolute path; a base that moved, or
    one given again with --model, is taken as `base`."""
    config = Path(adapter_dir) / "adapter_config.json"
    try:
        stored = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return base
    if not base or not isinstance(stored, str) or not stored or stored == base:
        return base
    found = adapter_base(stored, Path(adapter_dir))
    try:
        same = os.path.samefile(Path(found).expanduser(), Path(base).expanduser())
    except OSError:  # either is not on this machine (a hub id, a moved base)
        return base
    # relative to the adapter: loaded through the found path, re-stored relative on save
    return found if same else base


def is_file_location(location: str) -> bool:
    """Whether the part of a user reward before ':' names a file (else a module)."""
    return location.endswith(".py") or "/" in location or "\\" in location


def map_reward_files(raw: Any, change: Callable[[str], str]) -> Any:
    """The config's `rewards` value, in any form parse_reward_specs reads, with the file
    path of each 'path/to/file.py:function' entry and each reward model folder replaced
    by change(path); everything else as it was. A run directory stores these paths so that it can move
    (gft/runpaths.py), as it does its model and data."""
    def renamed(name: Any) -> Any:
        if not isinstance(name, str):
            return name
        if ":" not in name and name not in BUILTIN_REWARDS and looks_local(name):
            # a reward model's folder
            return change(name)
        location, sep, attribute = name.rpartition(":")
        if not sep or not location or not is_file_location(location):
            return name
        return f"{change(location)}:{attribute}"

    def item(value: Any) -> Any:
        if isinstance(value, dict) and "name" in value:
            return {**value, "name": renamed(value["name"])}
        return renamed(value)

    if isinstance(raw, (list, tuple)):
        return [item(value) for value in raw]
    if isinstance(raw, dict) and "name" not in raw:  # {name: weight}
        return {renamed(name): weight for name, weight in raw.items()}
    return item(raw)
