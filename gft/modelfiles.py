"""The model directory: what transformers, mlx-lm and gft all load.

- `write_portable_config`: a config.json both libraries read the same way;
- `load_tokenizer`: the tokenizer, with a pad token;
- checks that run before a backend loads anything (`check_model_dir`,
  `check_optimizer_state`), so a missing or corrupted file is one clear line.
Model files are read as safetensors only: no pickle anywhere.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gft.errors import ModelError, first_line

OPTIMIZER_FILE = "optimizer.safetensors"


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
    cfg, problems = portable_config(Path(model_dir))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return problems


def portable_config(model_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(config.json as written by write_portable_config, the differences it cannot
    remove), without writing anything: what a backend loading a user's directory reads."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    tf = transformers_reading(Path(model_dir))
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
    return cfg, problems + _unportable(cfg)


_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def transformers_reading(model_dir: Path) -> dict[str, Any]:
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


def stored_dtype(model_dir: Path) -> str | None:
    """The one float dtype a model directory's weights are stored in ('bfloat16', ...), or
    None (mixed, none, or not float)."""
    stored = set(_stored_weights(Path(model_dir)).values())
    return _ST_DTYPES.get(stored.pop()) if len(stored) == 1 else None


def stored_weight_names(model_dir: Path) -> set[str]:
    """The tensor names stored in a model directory's safetensors files."""
    return set(_stored_weights(Path(model_dir)))


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
    fixed = MLX_ACTIVATION.get(kind)
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or fixed
    if fixed and _ACT_SAME.get(act, act) != fixed:
        out.append(f"hidden_act {act}: mlx-lm's {kind} always uses {fixed}")
    return out


# The activation mlx-lm 0.32 hard-codes per architecture, whatever config.json says
# (transformers reads `hidden_act`). Gemma and StarCoder2 default to gelu_pytorch_tanh in
# transformers while mlx-lm computes the exact gelu: a one-step loss 1e-5 off, gradients
# 4e-4 off on a tiny model. Found by tests/test_archs.py.
MLX_ACTIVATION = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu",
                  "granite": "silu", "olmo2": "silu", "phi3": "silu",
                  "gemma": "gelu", "starcoder2": "gelu"}
_ACT_SAME = {"swish": "silu"}


def uniform_sliding_window(config) -> int | None:
    """The window of a model whose transformers config has `sliding_window` but no
    `layer_types` (Mistral, Phi-3: transformers masks every layer to the last
    sliding_window tokens); None for full attention, or where layer_types says which
    layers slide (Qwen2, whose layer_types transformers derives; Gemma 2)."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    if getattr(text, "layer_types", None) is not None or not isinstance(window, int) \
            or isinstance(window, bool):
        return None
    return window


def tokenizer_source(model_path: str, adapter: str | None) -> str:
    """Where a backend reads the tokenizer: a LoRA checkpoint's own tokenizer files when
    it has them (it travels with them), else the base model's."""
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        return str(adapter)
    return model_path


def load_tokenizer(model_path: str, *, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS if none); needs an EOS token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = first_line(e)
        raise ModelError(f"{model_path}: cannot load the tokenizer: {first}") from None
    if tok.eos_token_id is None:
        raise ModelError(f"{model_path}: the tokenizer has no EOS token; rollouts could never "
                         "stop. Set eos_token in tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out everywhere, any id works
        tok.gft_pad_from_eos = True  # ours, not the user's: save_tokenizer leaves it out
    return tok


def save_tokenizer(tok, path: Path) -> None:
    """The tokenizer as the user gave it: a pad token load_tokenizer filled in is not
    written (with pad == EOS saved, a later trainer that masks padding out of the labels,
    as transformers' language-modeling collator does, would never teach EOS)."""
    ours = getattr(tok, "gft_pad_from_eos", False)
    if ours:
        tok.pad_token = None
    try:
        tok.save_pretrained(str(path))
    finally:
        if ours:
            tok.pad_token = tok.eos_token


# ---------------------------------------------------------------------------------------
# Durable, atomic writes


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


# JSON files of a model directory that the loaders read as objects (key: value).
JSON_FILES = ("config.json", "adapter_config.json", "generation_config.json",
              "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object: anything else is a one-line ModelError."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path}: must be a JSON object (key: value), got a "
                         f"{type(value).__name__}")
    return value


def is_gguf(path: str | Path) -> bool:
    """A GGUF file (llama.cpp, Ollama, LM Studio; gft/hf_formats.py converts it): named *.gguf,
    or starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_model_dir(model: str | Path) -> None:
    """Fail early, in one line, on a local model directory that cannot be loaded: no
    config.json, a JSON file that is not an object, no weights, only pickle weights (never
    loaded), a missing shard, or a corrupted/truncated safetensors file. A name that is not a local path (a hub id) is
    left to the backend."""
    path = Path(model)
    if not path.exists():
        text = str(model)
        hub_id = text.count("/") <= 1 and not text.startswith((".", "/", "~", "\\"))
        if not hub_id:
            raise ModelError(f"{model}: no such model directory")
        return  # a hub id: the backend downloads it, or says why not
    if not path.is_dir():
        if is_gguf(path):
            raise ModelError(f"{model}: a GGUF file; gft trains Hugging Face-layout "
                             f"directories: convert it once with `gft convert {model} DIR` "
                             "(de-quantized through transformers), then use DIR")
        raise ModelError(f"{model}: not a model directory (expected config.json, "
                         "model.safetensors and tokenizer files)")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        if (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
            # `gft eval runs/x` for `gft eval runs/x/final`: say which directory is meant
            raise ModelError(f"{model}: a gft run directory, not a model; its trained model "
                             f"is {path / 'final'} (a step's: {path / 'checkpoints'}/step-N)")
        if path.name.startswith("models--") and (path / "snapshots").is_dir():
            # the Hugging Face cache's folder of one repository, as a user finds it there
            repo = path.name.removeprefix("models--").replace("--", "/")
            ref = path / "refs" / "main"
            snapshot = path / "snapshots" / (ref.read_text().strip() if ref.is_file() else "REV")
            raise ModelError(f"{model}: the Hugging Face cache's folder of {repo}, not a model; "
                             f"name it by its id ({repo}) or give its snapshot, {snapshot}")
        raise ModelError(f"{model}: no config.json; not a Hugging Face-layout model directory")
    for name in JSON_FILES:
        if (path / name).is_file():
            read_json_object(path / name)
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


def check_loaded_weights(model_path: str, missing: list[str], unexpected: list[str],
                         mismatched: list[Any] = ()) -> None:
    """What a loader reported (transformers' loading info): tensors the model has but the
    files lack would be randomly initialized, tensors the files have but the model lacks
    would be dropped. Either means config.json describes another model than its weights:
    an error naming a few of each, never a silently re-initialized model."""
    if not (missing or unexpected or mismatched):
        return
    def few(names: list[Any]) -> str:
        shown = [str(n[0] if isinstance(n, (tuple, list)) else n) for n in sorted(names, key=str)]
        return ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
    parts = [f"{len(v)} {label} ({few(v)})" for label, v in (
        ("missing, would be randomly initialized", missing),
        ("unexpected, would be ignored", unexpected), ("of another shape", mismatched)) if v]
    raise ModelError(f"{model_path}: the weights do not match the model config.json describes: "
                     f"{'; '.join(parts)}; check config.json (model_type, architectures, sizes) "
                     "against the weight files")


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
