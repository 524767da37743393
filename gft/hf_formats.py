"""Models only transformers can read, written as plain Hugging Face-layout directories that
gft, transformers and mlx-lm train and load:
- `gft convert MODEL.gguf DIR`: a GGUF file (llama.cpp, Ollama, LM Studio);
- `gft convert DIR DST --dequantize` over a checkpoint transformers quantized (bitsandbytes,
  as Unsloth's *-bnb-4bit models are saved; whatever transformers' `dequantize()` takes).

GGUF holds the weights (most often quantized: Q4_K, Q8_0, ...), the tokenizer and the chat
template in one file. transformers reads it (`from_pretrained(dir, gguf_file=name)`, with
the `gguf` package): the weights are de-quantized to floating point, the tokenizer rebuilt
as a fast tokenizer with its special tokens and chat template. What this module adds:
- transformers refuses to `save_pretrained` a model it loaded from GGUF ("not
  serializable"): the model is plain floating point by then, so the GGUF marker
  (`quantization_config`, the quantizer) is dropped and it saves as any model; a
  bitsandbytes model is made floating point by transformers' own `dequantize()`;
- config.json is made portable (gft.modelfiles.write_portable_config: mlx-lm reads only a
  top-level rope_theta, which transformers 5 does not write);
- the directory appears whole or not at all (written beside, then renamed);
- the quantization the weights went through is said, since it stays in them: a Q4 file
  de-quantized is a float model with 4-bit-rounded weights, not the original.
Simplification: the model is held in memory whole (float32 by default: 4 bytes per
parameter; `--dtype bfloat16` halves it).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from gft.errors import ConfigError, ModelError, first_line
from gft.modelfiles import write_portable_config


def quant_types(path: Path) -> list[str]:
    """The GGUF tensor types of the file's weights (e.g. ['F32', 'Q4_1']), read from its
    header through the gguf package (memory-mapped: no weight is read)."""
    from gguf import GGUFReader
    return sorted({t.tensor_type.name for t in GGUFReader(str(path)).tensors})


def _require_readers(gguf: bool = True) -> None:
    names = ("gguf", "torch", "transformers") if gguf else ("torch", "transformers")
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"this conversion goes through transformers and needs "
                          f"{', '.join(missing)}: pip install 'gft[torch{',gguf' if gguf else ''}]'")


def convert_gguf(src: Path, dst: Path, *, dtype: str | None,
                 shard_size: str | int) -> list[str]:
    """Write the GGUF file `src` as the model directory `dst` (weights in `dtype`, default
    float32); returns the lines to print."""
    _require_readers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per tensor otherwise
    src, dtype = Path(src), dtype or "float32"
    try:
        types = quant_types(src)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name,
                                                     dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
        first = first_line(e)
        raise ModelError(f"{src}: transformers cannot read this GGUF file: {first}") from None
    # the weights are plain floats now; only the GGUF marker stops save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    notes = _save(model, tokenizer, dst, shard_size)
    quantized = [t for t in types if t not in ("F32", "F16", "BF16")]
    lines = [f"wrote {dst}: {model.config.model_type}, {_count(model)} parameters in {dtype}, "
             f"tokenizer{' and chat template' if tokenizer.chat_template else ''} "
             f"from the GGUF file"]
    if quantized:
        lines.append(f"note: the GGUF weights were quantized ({', '.join(quantized)}): "
                     f"de-quantized, they keep that rounding; start from the original "
                     f"full-precision model where you have it")
    return lines + [f"warning: {n}" for n in notes]


def dequantize_hf(src: Path, dst: Path, *, method: str, dtype: str | None,
                  shard_size: str | int) -> list[str]:
    """Write the checkpoint `src`, quantized by transformers (`method`, described), in
    floating point (`dtype`, default float32) through transformers' `dequantize()`."""
    _require_readers(gguf=False)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    dtype = dtype or "float32"
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype),
                                                     device_map={"": "cpu"})
        model = model.dequantize()
        tokenizer = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, RuntimeError, NotImplementedError, ImportError) as e:
        first = first_line(e)
        raise ModelError(f"{src}: transformers cannot de-quantize this {method} model: "
                         f"{first}") from None
    notes = _save(model, tokenizer, dst, shard_size)
    return [f"wrote {dst}: {model.config.model_type}, {_count(model)} parameters in {dtype}, "
            f"de-quantized from {method} by transformers",
            f"note: the weights keep their {method} rounding; start from the original "
            "full-precision model where you have it"] + [f"warning: {n}" for n in notes]


def _count(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,}"


def _save(model, tokenizer, dst: Path, shard_size: str | int) -> list[str]:
    """save_pretrained, config made portable, written beside dst and swapped in
    (gft.checkpoint.atomic_directory): the directory appears whole or not at all.
    Returns write_portable_config's warnings."""
    from gft.checkpoint import atomic_directory
    notes: list[str] = []

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        notes.extend(write_portable_config(tmp))
    atomic_directory(dst, write)
    return notes
