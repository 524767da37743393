"""Quantized base models, backend-neutral: what a model directory's config.json says about
its quantization, which backend can load it, and the record an adapter keeps of it.

mlx-lm writes a quantized model's config.json with
    "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
                     "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6, ...}, ...}
(the same dict again as "quantization_config"); per-layer entries are mixed-precision
recipes (`mlx_lm.convert --quant-predicate mixed_3_6`) and `false` marks a layer left in
float. transformers' own quantized checkpoints (bitsandbytes, GPTQ, AWQ, ...) carry a
"quantization_config" with a "quant_method" instead; those are not mlx-lm's and are left
to transformers.

Deliberate choices:
- A quantized base trains LoRA adapters only: the packed integer weights have no
  gradient, so a "full" fine-tune would silently train only the norms and biases. It is
  refused before loading, with the key that fixes it.
- transformers cannot load mlx-lm's packed weights (uint32 words + scales + biases): the
  torch backend is refused before loading with what to do instead.
- The adapter's record of its base's quantization is a sidecar file, BASE_QUANT_FILE, not
  a key in adapter_config.json: peft warns about unknown keys there on every load.
No torch and no mlx here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gft.errors import ConfigError, ModelError

BASE_QUANT_FILE = "base_quantization.json"
_GLOBAL_KEYS = ("group_size", "bits", "mode")


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a local model directory; {} when there is none (a hub id)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the model config: {e}") from None


def mlx_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """mlx-lm's quantization dict of a config.json, or None (not quantized, or quantized
    some other way: a transformers quantization_config names its quant_method)."""
    q = config.get("quantization")
    if q is None:
        q = config.get("quantization_config")
        if not isinstance(q, dict) or "quant_method" in q:
            return None
    return q if isinstance(q, dict) and "bits" in q else None


def mlx_load_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """What to hand mlx-lm's load_model beside a config.json whose mlx-lm quantization
    sits under "quantization_config" alone: mlx-lm reads that key as a transformers one
    (KeyError 'quant_method') and would not build its quantized layers, so the dict goes
    over under its own name, "quantization". Empty otherwise."""
    q = mlx_quantization(config)
    return {"quantization": q} if q is not None and "quantization" not in config else {}


def hf_quantization(config: dict[str, Any]) -> dict[str, Any] | None:
    """A transformers quantization_config (bitsandbytes, GPTQ, ...), or None."""
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and "quant_method" in q else None


def describe_hf(q: dict[str, Any]) -> str:
    """'bitsandbytes 4-bit nf4', 'gptq 4-bit', 'awq', ... for a transformers
    quantization_config."""
    method = str(q.get("quant_method", "quantized"))
    if q.get("load_in_4bit"):
        return f"{method} 4-bit {q.get('bnb_4bit_quant_type', '')}".strip()
    if q.get("load_in_8bit"):
        return f"{method} 8-bit"
    return f"{method} {q['bits']}-bit" if q.get("bits") else method


def describe(q: dict[str, Any]) -> str:
    """'4-bit, group size 64 (affine)', plus the per-layer bit widths of a mixed recipe."""
    text = f"{q.get('bits')}-bit, group size {q.get('group_size')} ({q.get('mode', 'affine')})"
    layers = {k: v for k, v in q.items() if k not in _GLOBAL_KEYS}
    if layers:
        bits = sorted({v.get("bits") for v in layers.values() if isinstance(v, dict)})
        unq = sum(1 for v in layers.values() if v is False)
        parts = [f"{len(layers)} per-layer entries"]
        if bits:
            parts.append(f"bits {'/'.join(str(b) for b in bits)}")
        if unq:
            parts.append(f"{unq} layers unquantized")
        text += f", mixed: {', '.join(parts)}"
    return text


def check_loadable(backend: str, model_dir: str | Path, *, lora: Any,
                   adapter: str | None = None, load_in_4bit: bool = False,
                   train: bool = True) -> None:
    """Refuse, before any weight is read, what cannot work on a quantized base:
    full fine-tuning (on any backend), mlx-lm's format on torch, QLoRA off torch.
    train=False (generate, eval): the model only samples, so no adapter is needed."""
    if load_in_4bit:
        if backend != "torch":
            raise ConfigError("load_in_4bit is bitsandbytes on the torch backend; on mlx "
                              f"quantize the base instead: gft convert {model_dir} DST "
                              "--quantize 4, then train with --model DST")
        if lora is None:
            raise ConfigError("load_in_4bit loads a frozen 4-bit base for QLoRA: set "
                              "lora_rank (e.g. --set lora_rank=8)")
    config = read_config(model_dir)
    hf = hf_quantization(config)
    if hf is not None:
        _check_hf_quantized(backend, model_dir, hf, lora=lora, train=train)
    q = mlx_quantization(config)
    if q is None:
        return
    if backend == "torch":
        where = (f"the adapter {adapter} was trained over {model_dir}, " if adapter
                 else f"{model_dir}: ")
        fix = ("name the full-precision base (gft generate --base DIR, gft train --resume RUN "
               "--model DIR), " if adapter else "")
        raise ModelError(f"{where}an mlx-lm quantized model ({describe(q)}) that transformers "
                         f"cannot load: {fix}make a full-precision copy with gft convert "
                         f"{model_dir} DST --dequantize, or use --backend mlx")
    if lora is None and train:
        raise ConfigError(f"{model_dir} is quantized ({describe(q)}): its packed weights cannot "
                          "be trained, only LoRA adapters over them; set lora_rank "
                          "(e.g. --set lora_rank=8)")


def _check_hf_quantized(backend: str, model_dir: str | Path, q: dict[str, Any], *,
                        lora: Any, train: bool) -> None:
    """A checkpoint quantized by transformers (bitsandbytes as Unsloth's *-bnb-4bit
    models are saved, GPTQ, AWQ, ...): mlx-lm reads none of these formats, and on torch
    its integer weights have no gradient: a "full" fine-tune would train the norms and
    embeddings alone, through kernels that may have no backward, and then fail to save.
    LoRA over it (QLoRA) on torch is what works."""
    if q.get("dequantize"):  # transformers loads it as floats (Mxfp4Config(dequantize=True))
        return
    what = f"{model_dir} is quantized by transformers ({describe_hf(q)})"
    if backend == "mlx":
        raise ModelError(f"{what}, a format mlx-lm cannot read: use --backend torch (LoRA "
                         f"over it), or write it in floating point with gft convert "
                         f"{model_dir} DST --dequantize (then --quantize 4 for mlx-lm)")
    if lora is None and train:
        raise ConfigError(f"{what}: its quantized weights cannot be trained, only LoRA "
                          "adapters over them (QLoRA); set lora_rank (e.g. --set "
                          "lora_rank=8), or start from the full-precision model")


# ------------------------------------------------------------------ the adapter's record

def base_record(base: str | Path) -> dict[str, Any] | None:
    """What an adapter records of its base's quantization (None: a float base)."""
    cfg = read_config(base)
    q = mlx_quantization(cfg)
    if q is not None:
        return {"base_model": str(base), "format": "mlx-lm", "quantization": q,
                "description": describe(q)}
    hf = hf_quantization(cfg)
    if hf is not None:
        return {"base_model": str(base), "format": "transformers", "quantization": hf,
                "description": describe_hf(hf)}
    return None


def write_base_record(adapter_dir: str | Path, record: dict[str, Any] | None) -> None:
    """The record beside the adapter, its base named as adapter_config.json names it
    (gft.runpaths.base_for_adapter: never relative to the working directory)."""
    from gft.runpaths import base_for_adapter
    if record is not None:
        record = {**record, "base_model": base_for_adapter(record["base_model"], Path(adapter_dir))}
        (Path(adapter_dir) / BASE_QUANT_FILE).write_text(
            json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_base_record(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The record, its base_model found from here (a base inside the adapter's run is
    stored relative to the adapter). It names the base the adapter was trained over,
    which adapter_config.json may no longer name (gft convert --base, a moved base)."""
    from gft.runpaths import adapter_base
    path = Path(adapter_dir) / BASE_QUANT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable: {e}") from None
    if not isinstance(record, dict):
        raise ModelError(f"{path}: must be a JSON object, got a {type(record).__name__}")
    if isinstance(record.get("base_model"), str):
        record["base_model"] = adapter_base(record["base_model"], Path(adapter_dir))
    return record


def copy_base_record(source: str | Path, target: str | Path) -> None:
    """The record copied beside the adapter's copy in `target` (final/ from a step
    checkpoint, gft convert's output), its base re-stored for the new place: copied as
    is, a base stored relative to the adapter would name another directory there."""
    record = read_base_record(source)
    if record is not None:
        write_base_record(target, record)
