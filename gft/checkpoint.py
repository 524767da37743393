"""Checkpoints: a Hugging Face-layout model directory plus backend-neutral trainer state.

    RUN_DIR/checkpoints/step-000040/   config.json, model.safetensors, tokenizer files,
                                       generation_config.json   (transformers/mlx-lm load it)
                                       optimizer.safetensors    (AdamW moments by param name)
                                       trainer_state.json       (step, data position, config)
    RUN_DIR/checkpoints/latest         name of the newest complete checkpoint
    RUN_DIR/final/                     the last checkpoint of a finished run

Crash safety, step by step (a SIGKILL or power cut may land anywhere):
- a checkpoint is written into `.step-N.tmp-PID/`, every file fsynced, then renamed to
  `step-N/` and the parent directory fsynced: a directory under its real name is complete;
- `latest` is written to `latest.tmp`, fsynced and renamed over the old pointer;
- old checkpoints are first renamed to `.step-N.del-PID/`, then deleted;
- replacing a directory (final/ of a resumed run) renames the old one to `.final.old-PID/`
  first; if a crash lands between the two renames, the next save or resume puts it back;
- leftovers of a dead process (`.*.tmp-*`, `.*.del-*`, `.*.old-*`) are removed by the next
  save; resume never reads a dot-directory.
Model files are read as safetensors only: no pickle anywhere.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from gft.errors import GFTError, ModelError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)$")


class CheckpointError(GFTError):
    """A checkpoint that could not be written (full disk, permissions); nothing saved
    before it is damaged. Like any file system failure, `gft` exits with 1, not 2."""
    exit_code = 1


def write_portable_config(model_dir: Path) -> list[str]:
    """Make config.json read the same in transformers and mlx-lm; return, one line each,
    the differences no config can remove (the checkpoint then loads in one library only,
    or loads differently).

    transformers' reading is the reference; the keys mlx-lm reads are written to match it.
    Differences found between transformers 5.24 and mlx-lm 0.32 (Llama, Qwen2, Qwen3):
    - RoPE base: transformers 5 writes it only under `rope_parameters`; mlx-lm's llama and
      qwen2 read only a top-level `rope_theta` and silently use 10000 (llama) or 1e6
      (qwen2) without it. Written at the top level, always equal to transformers' value.
    - RoPE scaling (llama3, linear, dynamic, yarn, ...): transformers 5 keeps it inside
      `rope_parameters`; mlx-lm's llama and qwen2 read only `rope_scaling`. Written as
      `rope_scaling` (transformers reads that key back into the same rope_parameters).
    - tie_word_embeddings when absent: transformers reads False, mlx-lm's llama and qwen2
      True, mlx-lm's qwen3 refuses to load. Written explicitly; when the key is missing,
      the weights decide (a stored lm_head.weight means untied).
    - `dtype` when it disagrees with the stored weights: transformers 5 loads in the config's
      dtype, mlx-lm in the stored one. Set to the stored dtype.
    - Qwen2's `head_dim` (mlx-lm ignores it), Qwen3's `attention_bias` and Qwen2/3's
      `use_sliding_window` (mlx-lm has neither) and mlx-lm's `rope_traditional` cannot be
      expressed in the other library: reported, not changed.
    """
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    tf = _transformers_reading(Path(model_dir))
    rope = tf.get("rope_parameters") or cfg.get("rope_parameters")
    if rope is None and ("rope_theta" in cfg or "rope_scaling" in cfg):  # pre-5 layout
        rope = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
    problems: list[str] = []
    if isinstance(rope, dict) and "rope_theta" in rope:
        rope = {k: v for k, v in rope.items() if k != "type"}
        rope.setdefault("rope_type", (cfg.get("rope_scaling") or {}).get("type", "default"))
        cfg["rope_parameters"] = rope
        cfg["rope_theta"] = rope["rope_theta"]
        cfg.pop("rope_scaling", None)
        if rope["rope_type"] != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    elif rope:
        problems.append(f"rope_parameters per layer type ({sorted(rope)}) are not read by mlx-lm")
    weights = _stored_weights(Path(model_dir))
    if "tie_word_embeddings" not in cfg:
        cfg["tie_word_embeddings"] = ("lm_head.weight" not in weights if weights
                                      else bool(tf.get("tie_word_embeddings", False)))
    for key in ("head_dim", "max_position_embeddings", "num_key_value_heads"):
        if tf.get(key) is not None and (key != "head_dim" or cfg.get("model_type") != "qwen2"):
            cfg[key] = tf[key]
    stored = {v for v in weights.values() if v in _ST_DTYPES}
    if len(stored) == 1:
        cfg["dtype"] = _ST_DTYPES[stored.pop()]
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return problems + _unportable(cfg)


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _transformers_reading(model_dir: Path) -> dict[str, Any]:
    """The config as transformers reads it (defaults and legacy keys resolved); {} when
    transformers does not know the architecture."""
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(model_dir)).to_dict()
    except (ImportError, ValueError, KeyError, OSError, TypeError):
        return {}


def _stored_weights(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype code of the weights in a model directory."""
    out: dict[str, str] = {}
    for f in model_weight_files(model_dir):
        if f.is_file():
            out.update({k: v.get("dtype") for k, v in read_safetensors_header(f).items()
                        if k != "__metadata__" and isinstance(v, dict)})
    return out


def _unportable(cfg: dict[str, Any]) -> list[str]:
    """What transformers and mlx-lm would still read differently in this config."""
    kind, out = cfg.get("model_type"), []
    heads, hidden = cfg.get("num_attention_heads") or 1, cfg.get("hidden_size") or 0
    if kind == "qwen2" and cfg.get("head_dim") not in (None, hidden // heads):
        out.append(f"qwen2 head_dim {cfg['head_dim']} != hidden_size/num_attention_heads: "
                   "mlx-lm's qwen2 ignores head_dim and cannot load these weights")
    if kind == "qwen3" and cfg.get("attention_bias"):
        out.append("qwen3 attention_bias: mlx-lm's qwen3 has no attention biases")
    if kind in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        out.append(f"{kind} use_sliding_window: mlx-lm attends over the full context")
    if cfg.get("rope_traditional"):
        out.append("rope_traditional (an mlx-lm key): transformers has no such RoPE layout")
    if cfg.get("hidden_act", "silu") != "silu" and kind in ("llama", "qwen2", "qwen3"):
        out.append(f"hidden_act {cfg['hidden_act']}: mlx-lm's {kind} always uses silu")
    return out


def load_tokenizer(model_path: str, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS if none); needs an EOS token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{model_path}: cannot load the tokenizer: {first}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_path}: the tokenizer has no EOS token; rollouts could never "
                         "stop. Set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, any id works
    return tok


# ---------------------------------------------------------------------------------------
# Durable, atomic writes


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (directory entries must be durable too)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (POSIX only: Windows cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    """Is another process with this id running? Our own id counts as dead: this process
    writes one checkpoint at a time, so any leftover with its id is from a killed run
    (containers reuse small pids)."""
    if pid == os.getpid() or os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(root: Path) -> list[Path]:
    """Remove what killed writers left in `root` (`.X.tmp-PID`, `.X.del-PID`, `.X.old-PID`
    of processes no longer running); a `.X.old-PID` whose X is missing was cut short while
    being replaced and is complete, so it is renamed back to X. Returns what it touched."""
    root = Path(root)
    if not root.is_dir():
        return []
    touched = []
    for entry in sorted(root.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        target = root / match["target"]
        if match["kind"] == "old" and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    return touched


def atomic_directory(target: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir), fsync it, then swap it in as `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():  # replacing (e.g. final/): move the old one aside first
            os.replace(target, old)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target


def _remove_dir(path: Path) -> None:
    """Rename first, so a crash mid-delete never leaves a half checkpoint under its name."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Saving


def _io_failure(exc: BaseException) -> str | None:
    """The reason, if `exc` is the file system failing (full disk, permissions, ...).
    safetensors reports a full disk as SafetensorError("... No space left on device (os
    error 28)") and mlx as RuntimeError("[write] Unable to write N bytes to file."),
    neither as OSError."""
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0)
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{reason} [{name}]" if name else reason
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" or re.search(
            r"os error \d+|Errno \d+|No space left|Disk quota|Unable to (write|open)", text):
        return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return None


def _resume_hint(run_dir: Path) -> str:
    import shlex
    return f"gft train --resume {shlex.quote(str(run_dir))}"


def run_dir_of(checkpoint: Path) -> Path:
    """RUN_DIR of RUN_DIR/final or RUN_DIR/checkpoints/step-N."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def save_checkpoint(backend, directory: Path, state: dict[str, Any]) -> Path:
    """Model, optimizer and trainer state into `directory`, atomically. A failing file
    system (a full disk) is a one-line CheckpointError; whatever was saved before is intact."""
    def write(tmp: Path) -> None:
        backend.save_model(tmp)
        backend.save_optimizer(tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    directory = Path(directory)
    try:
        return atomic_directory(directory, write)
    except Exception as exc:
        reason = _io_failure(exc)
        if reason is None:
            raise
        raise CheckpointError(f"cannot save checkpoint {directory}: {reason}; "
                              + _previous_note(run_dir_of(directory))) from exc


def _previous_note(run_dir: Path) -> str:
    try:
        previous = latest_checkpoint(run_dir)
    except GFTError:
        previous = None
    if previous is None:
        return "nothing was saved before it"
    return (f"the previous checkpoint {previous} is intact: free some space, then "
            f"{_resume_hint(run_dir)}")


def save_step_checkpoint(backend, run_dir: Path, step: int, state: dict[str, Any],
                         keep: int) -> Path:
    """checkpoints/step-N, then the `latest` pointer, then prune to the last `keep`.

    Step directories after N are leftovers of a timeline a crash cut short (saved, but
    never named by `latest`); the run now re-creates them, so they go too."""
    root = Path(run_dir) / "checkpoints"
    path = save_checkpoint(backend, root / f"step-{step:06d}", state)
    try:
        atomic_write_text(root / "latest", path.name + "\n")
    except OSError as exc:
        raise CheckpointError(f"cannot update {root / 'latest'}: {_io_failure(exc)}; "
                              + _previous_note(Path(run_dir))) from exc
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    older = [p for p in steps if p.name < path.name]
    for old in older[:max(len(older) - (keep - 1), 0)] + [p for p in steps if p.name > path.name]:
        _remove_dir(old)
    return path


# ---------------------------------------------------------------------------------------
# Finding and reading checkpoints


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint directory with everything a resume reads."""
    checkpoint = Path(checkpoint)
    adapter = all((checkpoint / name).is_file()  # a LoRA run's: the adapter, PEFT format
                  for name in ("adapter_config.json", "adapter_model.safetensors"))
    return (checkpoint / STATE_FILE).is_file() and (adapter or (
        (checkpoint / "config.json").is_file() and (
            (checkpoint / "model.safetensors").is_file()
            or (checkpoint / "model.safetensors.index.json").is_file())))


def checkpoint_step(checkpoint: Path) -> int:
    return int(read_state(checkpoint).get("loop", {}).get("step", 0))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None: final/ or the one `latest`
    names, whichever holds the later step (final/ on a tie). Temporary and half-deleted
    directories (names starting with '.') are never considered."""
    run_dir = Path(run_dir)
    candidates = []
    pointer = run_dir / "checkpoints" / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if re.fullmatch(r"step-\d+", name):
            candidates.append(run_dir / "checkpoints" / name)
    candidates.append(run_dir / "final")
    best: tuple[int, Path] | None = None
    for path in candidates:
        if is_complete(path):
            step = checkpoint_step(path)
            if best is None or step >= best[0]:
                best = (step, path)
    return best[1] if best else None


def read_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: unreadable trainer state: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("loop"), dict) \
            or not isinstance(state.get("config"), dict):
        raise ModelError(f"{path}: not a gft trainer state (needs 'loop' and 'config')")
    return state


# ---------------------------------------------------------------------------------------
# Checking model files before a backend loads them


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, after checking the file is complete: a file
    cut short (a full disk, an interrupted copy) is a one-line ModelError here instead of
    a deep error inside the loader."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                raise ModelError(f"{path}: corrupted or truncated safetensors file "
                                 f"({size} bytes, no complete header)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: corrupted safetensors file (unreadable header)") from None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise ModelError(f"{path}: corrupted safetensors file (bad tensor entries)") from None
    if 8 + n + end != size:
        raise ModelError(f"{path}: corrupted or truncated safetensors file: its header "
                         f"describes {8 + n + end} bytes, the file has {size}")
    return header


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a Hugging Face-layout model directory (single or sharded),
    or of a LoRA checkpoint (its PEFT adapter)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: unreadable safetensors index") from None
        return [model_dir / s for s in shards]
    for name in ("model.safetensors", "adapter_model.safetensors"):  # a model, a LoRA adapter
        if (model_dir / name).is_file():
            return [model_dir / name]
    return sorted(f for f in model_dir.glob("*.safetensors") if f.name != OPTIMIZER_FILE)


def check_model_dir(model: str | Path) -> None:
    """Fail early, in one line, on a local model directory that cannot be loaded: no
    config.json, no weights, only pickle weights (never loaded), a missing shard, or a
    corrupted/truncated safetensors file. A name that is not a local path (a hub id) is
    left to the backend."""
    path = Path(model)
    if not path.exists():
        text = str(model)
        hub_id = text.count("/") <= 1 and not text.startswith((".", "/", "~", "\\"))
        if not hub_id:
            raise ModelError(f"{model}: no such model directory")
        return  # a hub id: the backend downloads it, or says why not
    if not path.is_dir():
        raise ModelError(f"{model}: not a model directory (expected config.json, "
                         "model.safetensors and tokenizer files)")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelError(f"{model}: no config.json; not a Hugging Face-layout model directory")
    files = model_weight_files(path)
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        if pickled:
            raise ModelError(f"{model}: only pickle weights ({', '.join(pickled)}); gft loads "
                             "safetensors only, never pickle. Convert them first, e.g. "
                             "model.save_pretrained(dir, safe_serialization=True)")
        raise ModelError(f"{model}: no model weights (model.safetensors) in the directory")
    for f in files:
        if not f.is_file():
            raise ModelError(f"{f}: weight shard listed in the index is missing")
        read_safetensors_header(f)


def check_optimizer_state(checkpoint: Path) -> None:
    """The AdamW moments in a checkpoint must match its model's parameter names and shapes
    (a checkpoint patched with another model's weights would fail deep in the optimizer)."""
    checkpoint = Path(checkpoint)
    optimizer = read_safetensors_header(checkpoint / OPTIMIZER_FILE)
    shapes: dict[str, list[int]] = {}
    for f in model_weight_files(checkpoint):
        shapes.update({k: v.get("shape") for k, v in read_safetensors_header(f).items()
                       if k != "__metadata__" and isinstance(v, dict)})
    for key, entry in optimizer.items():
        if key == "__metadata__":
            continue
        _, _, name = key.partition(".")
        if name not in shapes:
            raise ModelError(f"{checkpoint / OPTIMIZER_FILE}: optimizer state for '{name}', "
                             "which the model does not have (checkpoint from a different model?)")
        if entry.get("shape") != shapes[name]:
            raise ModelError(f"{checkpoint / OPTIMIZER_FILE}: optimizer state for '{name}' has "
                             f"shape {entry.get('shape')}, the model's is {shapes[name]} "
                             "(checkpoint from a different model?)")
