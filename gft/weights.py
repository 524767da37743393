"""Model weights on disk, through torch or MLX: sizes, shard plans, safetensors files, and
a model directory written portably. gft/convert.py and gft/quantize.py build on it; the
backends save their checkpoints through write_weights.

The shard plan is huggingface_hub's (the one transformers' save_pretrained uses) over the
tensors in natural name order, so the MLX backend and the torch backend shard identically:
model-0000K-of-0000N.safetensors plus model.safetensors.index.json.
Tensors are handled by torch or by MLX, whichever is installed (torch first): bfloat16 never
passes through NumPy, which has no such type.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from gft.errors import ConfigError, ModelError
from gft.lora import MLX_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS

DEFAULT_SHARD_SIZE = "5GB"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "B": 1}


# ------------------------------------------------------------------ shards

def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000 (GB = 10^9, GiB = 2^30, as the Hugging Face hub counts)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
    if match is None or (match[2] is None and "." in match[1]):
        raise ConfigError(f"size '{size}' must look like 500MB, 2GB or 1GiB")
    return int(float(match[1]) * _UNITS[(match[2] or "B").upper()])


def natural_key(name: str) -> tuple:
    """model.layers.2.x before model.layers.10.x."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def write_weights(path: Path, tensors: dict[str, Any], save: Callable[[Path, dict], None],
                  nbytes: Callable[[Any], int], shard_size: str | int) -> list[str]:
    """model.safetensors, or shards plus the index transformers writes; returns file names."""
    from huggingface_hub import split_state_dict_into_shards_factory
    ordered = {k: tensors[k] for k in sorted(tensors, key=natural_key)}
    split = split_state_dict_into_shards_factory(
        ordered, get_storage_size=nbytes, filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(shard_size))
    for filename, names in split.filename_to_tensors.items():
        save(Path(path) / filename, {n: ordered[n] for n in names})
    if split.is_sharded:
        total = sum(math.prod(t.shape) for t in ordered.values())
        index = {"metadata": {"total_parameters": total, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (Path(path) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return list(split.filename_to_tensors)


# ------------------------------------------------------------------ tensors (torch or MLX)

class _TorchArrays:
    name = "torch"

    def __init__(self):
        import torch
        from safetensors.torch import load_file, save_file
        self.torch, self._load, self._save = torch, load_file, save_file

    def load(self, path: Path) -> dict:
        return self._load(str(path))

    def save(self, path: Path, tensors: dict, metadata: dict[str, str]) -> None:
        self._save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)

    def dtype(self, x) -> str:
        return str(x.dtype).removeprefix("torch.")

    def is_float(self, x) -> bool:
        return x.is_floating_point()

    def cast(self, x, dtype: str):
        return x.to(getattr(self.torch, dtype))

    def t(self, x):
        return x.T.contiguous()

    def nbytes(self, x) -> int:
        return x.numel() * x.element_size()

    def fuse(self, w, a, b, scale: float, dtype: str | None = None):
        """W + scale·B·A summed in float32, rounded once: to `dtype`, else W's dtype."""
        out = getattr(self.torch, dtype) if dtype else w.dtype
        return (w.float() + scale * (b.float() @ a.float())).to(out)


class _MlxArrays:
    name = "mlx"

    def __init__(self):
        import mlx.core as mx
        self.mx = mx

    def load(self, path: Path) -> dict:
        return self.mx.load(str(path))

    def save(self, path: Path, tensors: dict, metadata: dict[str, str]) -> None:
        self.mx.save_safetensors(str(path), tensors, metadata=metadata)

    def dtype(self, x) -> str:
        return str(x.dtype).rsplit(".", 1)[-1]

    def is_float(self, x) -> bool:
        return self.mx.issubdtype(x.dtype, self.mx.floating)

    def cast(self, x, dtype: str):
        return x.astype(getattr(self.mx, dtype))

    def t(self, x):
        return x.T

    def nbytes(self, x) -> int:
        return x.nbytes

    def fuse(self, w, a, b, scale: float, dtype: str | None = None):
        """W + scale·B·A summed in float32, rounded once: to `dtype`, else W's dtype."""
        f32, out = self.mx.float32, getattr(self.mx, dtype) if dtype else w.dtype
        return (w.astype(f32) + scale * (b.astype(f32) @ a.astype(f32))).astype(out)


def arrays(framework: str | None = None):
    """torch's or MLX's tensors (framework None: torch if installed, else MLX)."""
    for name, cls in (("torch", _TorchArrays), ("mlx", _MlxArrays)):
        if framework in (None, name):
            try:
                return cls()
            except ImportError:
                if framework is not None:
                    raise ConfigError(f"{name} is not installed") from None
    raise ConfigError("gft convert needs torch or mlx: pip install 'gft[torch]' or 'gft[mlx]'")


# ------------------------------------------------------------------ models

def _weight_files(src: Path) -> list[Path]:
    from gft.modelfiles import model_weight_files
    files = [f for f in model_weight_files(src) if f.name not in (PEFT_WEIGHTS, MLX_WEIGHTS)]
    if not files:
        raise ModelError(f"{src}: no safetensors weights (gft reads safetensors only, never pickle)")
    return files


def load_weights(src: Path, ar) -> dict:
    out: dict = {}
    for f in _weight_files(src):
        out.update(ar.load(f))
    return out


_NOT_COPIED = (PEFT_CONFIG, "trainer_state.json")  # a gft checkpoint's state is not the model's


def write_model(dst: Path, src: Path, tensors: dict, ar, shard_size: str | int) -> list[str]:
    """tensors as a portable model directory `dst`, with src's other files (config,
    tokenizer, generation config) copied; returns write_portable_config's warnings."""
    from gft.modelfiles import write_portable_config
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        weights = f.suffix == ".safetensors" or f.name == INDEX_FILE
        if f.is_file() and not weights and f.suffix not in (".bin", ".pt", ".pth", ".pkl") \
                and f.name not in _NOT_COPIED:
            shutil.copyfile(f, dst / f.name)
    write_weights(dst, tensors, lambda p, t: ar.save(p, t, {"format": "pt"}), ar.nbytes,
                  shard_size)
    return write_portable_config(dst)
