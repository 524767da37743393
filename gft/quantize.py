"""Quantized model directories, through mlx-lm's own quantization (never a hand-written one):

    gft convert SRC DST --quantize 4|8 [--group-size N]   float model -> mlx-lm quantized
    gft convert SRC DST --dequantize                      mlx-lm quantized -> float model
    gft fuse ADAPTER --base QUANT OUT [--requantize]      W' = dequant(W) + s·B·A, written in
                                                          float, or quantized again as QUANT was

mlx-lm builds the model (`mlx_lm.utils.load_model`), quantizes it (`quantize_model`, which
is `nn.quantize` plus the config.json entries) or de-quantizes it (`dequantize_model`,
`mx.dequantize`); the files are then written as every gft model directory is
(gft.weights.write_model: shards, copied tokenizer, a config both libraries read alike),
with mlx-lm's "quantization" / "quantization_config" keys set or removed.

Deliberate choices:
- A layer whose input width is not a multiple of the group size stays in float (mlx-lm's
  rule); quantize_model reports the bits per weight it reached.
- Re-quantizing a fused model reproduces the base's layout: the same layers quantized,
  with the same global and per-layer (mixed recipe) bits and group sizes.
- The fused update is added to the *de-quantized* base weight in float32, then rounded
  (and re-quantized if asked): quantizing W + s·B·A again adds a second rounding, so a
  re-quantized fuse does not reproduce the adapter's logits exactly; the float one does.
Needs mlx (and mlx-lm); on a machine with torch only these commands say so.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from gft.errors import ConfigError, ModelError, first_line
from gft.quant import describe, mlx_load_overrides, mlx_quantization, read_config
from gft.weights import arrays, write_model

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def _mlx():
    try:
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten, tree_unflatten
        from mlx_lm import utils
    except ImportError:
        raise ConfigError("quantized models are handled by mlx-lm: pip install 'gft[mlx]' "
                          "(mlx[cpu] on Linux)") from None
    return mx, nn, tree_flatten, tree_unflatten, utils


def load_mlx_model(src: Path):
    """(mlx-lm model, config) of a model directory, quantized layers built as stored."""
    utils = _mlx()[4]
    raw = read_config(src)
    try:
        return utils.load_model(Path(src), lazy=True,
                                model_config=mlx_load_overrides(raw) or None)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise ModelError(f"{src}: mlx-lm cannot load the model: {first}") from None


def quantized_paths(model) -> set[str]:
    """Module paths of the model's quantized layers."""
    nn = _mlx()[1]
    kinds = tuple(k for k in (nn.QuantizedLinear, nn.QuantizedEmbedding,
                              getattr(nn, "QQLinear", None)) if k is not None)
    return {p for p, m in model.named_modules() if isinstance(m, kinds)}


def dequantize(model):
    """mlx-lm's dequantize_model, with the de-quantized weights in the model's own dtype
    (that of its unquantized floating parameters: norms, float layers). mx.dequantize
    returns the scales' dtype, which for affine is the model's; mxfp4/nvfp4/mxfp8 scales
    are uint8 and their weights come back bfloat16 whatever the model is, so a float32
    model would be written half in bfloat16 and a fused LoRA update rounded to bfloat16."""
    mx, _, tree_flatten, _, utils = _mlx()
    paths = quantized_paths(model)
    own = {v.dtype for k, v in tree_flatten(model.parameters())
           if mx.issubdtype(v.dtype, mx.floating) and k.rsplit(".", 1)[0] not in paths}
    model = utils.dequantize_model(model)
    if len(own) == 1:
        dtype, flat = own.pop(), dict(tree_flatten(model.parameters()))
        model.update(_tree({f"{p}.weight": flat[f"{p}.weight"].astype(dtype) for p in paths}))
    return model


def quantize(model, config: dict[str, Any], bits: int, group_size: int,
             layout: dict[str, Any] | None = None, paths: set[str] | None = None):
    """mlx-lm's quantize_model; with `layout` (a base's quantization dict) and `paths`
    (its quantized layers) the same layers get the same per-layer settings."""
    utils = _mlx()[4]
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    predicate = None
    if layout is not None and paths is not None:
        def predicate(path: str, module) -> bool | dict:
            return layout.get(path, path in paths)
    with contextlib.redirect_stdout(io.StringIO()) as said:  # "[INFO] Quantized model with ..."
        model, config = utils.quantize_model(model, config, group_size, bits, mode=
                                             (layout or {}).get("mode", "affine"),
                                             quant_predicate=predicate)
    bpw = said.getvalue().strip().rsplit("with", 1)[-1].strip().rstrip(".")
    return model, config["quantization"], bpw


def float_weights(model, dtype: str | None) -> dict[str, Any]:
    """The model's parameters by name, floating ones cast to dtype (None: kept)."""
    mx, _, tree_flatten, _, _ = _mlx()
    out = dict(tree_flatten(model.parameters()))
    if dtype:
        out = {k: v.astype(getattr(mx, dtype)) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in out.items()}
    return out


def set_quantization(dst: Path, q: dict[str, Any] | None) -> list[str]:
    """config.json of a written model: mlx-lm's quantization keys set (q) or removed."""
    from gft.modelfiles import write_portable_config
    path = dst / "config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    if q is not None:
        cfg["quantization"] = cfg["quantization_config"] = q
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return write_portable_config(dst)


def _write(dst: Path, src: Path, weights: dict, q: dict[str, Any] | None,
           shard_size: str | int) -> list[str]:
    write_model(dst, src, weights, arrays("mlx"), shard_size)
    return [f"warning: {w}" for w in set_quantization(dst, q)]


def quantize_dir(src: Path, dst: Path, *, bits: int, group_size: int | None,
                 dtype: str | None, shard_size: str | int) -> list[str]:
    """`gft convert SRC DST --quantize BITS`: a float model as an mlx-lm quantized one."""
    if bits not in BITS:
        raise ConfigError(f"--quantize takes {' or '.join(map(str, BITS))} bits, got {bits}")
    group_size = group_size or 64  # mlx-lm's default for affine quantization
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                          f"got {group_size}")
    q = mlx_quantization(read_config(src))
    if q is not None:
        raise ModelError(f"{src}: already quantized ({describe(q)}); de-quantize it first "
                         "(gft convert SRC DST --dequantize)")
    model, config = load_mlx_model(src)
    if dtype:
        model.update(_tree(float_weights(model, dtype)))
    model, layout, bpw = quantize(model, config, bits, group_size)
    weights = float_weights(model, None)
    lines = _write(dst, src, weights, layout, shard_size)
    return [f"wrote {dst}: quantized by mlx-lm, {describe(layout)}, {bpw}"] + lines


def dequantize_dir(src: Path, dst: Path, *, dtype: str | None,
                   shard_size: str | int) -> list[str]:
    """`gft convert SRC DST --dequantize`: an mlx-lm quantized model in full precision."""
    q = mlx_quantization(read_config(src))
    if q is None:
        raise ModelError(f"{src}: not an mlx-lm quantized model (no 'quantization' in "
                         "config.json); nothing to de-quantize")
    model, _ = load_mlx_model(src)
    model = dequantize(model)
    weights = float_weights(model, dtype)
    lines = _write(dst, src, weights, None, shard_size)
    kinds = sorted({str(v.dtype).rsplit(".", 1)[-1] for v in weights.values()})
    return [f"wrote {dst}: de-quantized from {describe(q)} to full precision "
            f"({', '.join(kinds)})"] + lines


def _tree(flat: dict[str, Any]):
    return _mlx()[3](list(flat.items()))


def fuse_quantized(base_dir: Path, out: Path, modules: dict[str, tuple[Any, Any]], scale: float,
                   *, requantize: bool, dtype: str | None,
                   shard_size: str | int) -> list[str]:
    """W' = dequant(W) + scale·B·A for every adapted weight of a quantized base; written in
    full precision, or (requantize) quantized again with the base's layout."""
    q = mlx_quantization(read_config(base_dir))
    model, config = load_mlx_model(base_dir)
    paths = quantized_paths(model)
    model = dequantize(model)
    weights = float_weights(model, None)
    ar = arrays("mlx")
    for module, (a, b) in modules.items():
        name = module + ".weight"
        if name not in weights:
            raise ModelError(f"{base_dir}: the adapter adapts '{module}', which has no weight "
                             "in the base model (tied embeddings?)")
        weights[name] = ar.fuse(weights[name], a, b, scale, dtype)  # one rounding
    if dtype:
        weights = {k: ar.cast(v, dtype) if ar.is_float(v) else v for k, v in weights.items()}
    head = f"wrote {out}: {len(modules)} adapted weights fused into {base_dir} ({describe(q)})"
    if not requantize:
        kinds = sorted({ar.dtype(v) for v in weights.values()})
        return [f"{head}, written de-quantized in full precision ({', '.join(kinds)}); "
                "--requantize keeps the base's quantization"] + _write(
            out, base_dir, weights, None, shard_size)
    model.update(_tree(weights))
    model, layout, bpw = quantize(model, config, q["bits"], q["group_size"], q, paths)
    return [f"{head}, re-quantized as the base: {describe(layout)}, {bpw}"] + _write(
        out, base_dir, float_weights(model, None), layout, shard_size)
