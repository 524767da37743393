"""A model named by its Hugging Face Hub id (`gft generate org/name`, `gft eval org/name`):
the local snapshot it is sampled from.

transformers' from_pretrained downloads only the files it reads (config, weights,
tokenizer, generation_config.json), so a gft run's `gft.json` (its prompt format and
stops, gft/checkpoint.py) uploaded beside them would never be read, and mlx-lm's
load_model takes a local folder only. As mlx-lm's own `load` does (get_model_path), the
repository's model files are fetched once with huggingface_hub's snapshot_download into
the Hugging Face cache (HF_HOME; offline with HF_HUB_OFFLINE=1 from a cached copy), and
everything after that reads the local folder: gft.json, generation_config.json's eos
ids, the weights, on either backend.
"""
from __future__ import annotations

from pathlib import Path

from gft.errors import ModelError, first_line
from gft.runpaths import looks_local

# what a model (or LoRA adapter) folder needs, as mlx-lm's get_model_path fetches it;
# no pickled *.bin / *.pt, no GGUF or ONNX copies some repositories also hold
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken",
               "tiktoken.model", "*.txt"]


def local_model(model: str) -> str:
    """`model` itself when it is a path on this machine (or written as one, which
    check_model_dir then reports missing); for a Hub id, its snapshot folder in the
    Hugging Face cache, downloaded when not there yet. A failure (not found, gated,
    offline without a cached copy) is one ModelError line."""
    if looks_local(model):
        return model
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # transformers depends on it; a mlx-only install may lack it
        raise ModelError(f"{model}: not a local path; reading it from the Hugging Face Hub "
                         "needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return str(snapshot_download(repo_id=model, allow_patterns=MODEL_FILES))
    except Exception as exc:  # not found, gated, no network, a bad id: one line
        raise ModelError(f"{model}: no such folder, and the Hugging Face Hub did not give a "
                         f"model of that id: {type(exc).__name__}: {first_line(exc)}") from None


def adapter_hub_base(path: str | Path) -> str | None:
    """The Hub id a LoRA adapter folder names as its base (PEFT's base_model_name_or_path,
    mlx-lm's `model`, as `mlx_lm.lora --model mlx-community/...` writes it), or None: not
    an adapter, or its base is a path. mlx-lm loads local folders only, so such a base is
    read from its snapshot (local_model), as a hub-id --model is."""
    from gft.lora import is_mlx_adapter, is_peft_adapter, read_mlx_config, read_peft_config
    if is_peft_adapter(path):
        base = read_peft_config(Path(path))[1]
    elif is_mlx_adapter(path):
        base = read_mlx_config(Path(path))[1]
        # mlx_lm.lora writes --model as typed: a bare name found nowhere is far more
        # likely a folder that did not move along (reported as such) than a hub id
        base = base if base and "/" in base else None
    else:
        return None
    return base if base and not looks_local(base) else None
