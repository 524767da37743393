"""`gft convert` and `gft fuse`: move models and adapters between transformers, mlx-lm and gft.

    gft convert SRC DST [--dtype D] [--shard-size S]   a model directory (transformers- or
        mlx-lm-written): weights re-saved (dtype, shards, {"format": "pt"}), config.json
        made portable (gft.modelfiles.write_portable_config), tokenizer and other files copied
    gft convert SRC DST [--to peft|mlx-lm] [--dtype D]  a LoRA adapter, PEFT <-> mlx-lm
        (gft/lora.py describes both formats)
    gft fuse ADAPTER --base BASE OUT                     W + s·B·A into each adapted weight
    gft convert SRC DST --quantize 4|8 | --dequantize    to and from mlx-lm's quantized
    gft fuse ... [--requantize]   over a quantized base   format: gft/quantize.py
    gft convert MODEL.gguf DST [--dtype D]               a GGUF file (llama.cpp, Ollama) as a
        model directory, de-quantized through transformers: gft/hf_formats.py
    gft convert DIR DST --dequantize                     a checkpoint transformers quantized
        (bitsandbytes), in floating point through transformers: gft/hf_formats.py

Tensors are handled by torch or by MLX, whichever is installed (torch first): bfloat16 never
passes through NumPy, which has no such type. The fused weight is computed in float32 and
rounded once to the weight's dtype: W' = dtype(float32(W) + s · float32(B) @ float32(A)).
(PEFT's merge rounds the bf16 update before adding it, mlx-lm's rounds the product before
adding; in float32 the three agree to rounding.)

Weights are read and written (shards, dtypes, torch or MLX) by gft/weights.py.
Simplification: a model is held in memory whole while it is converted.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gft.errors import ConfigError, ModelError
from gft.checkpoint import MODEL_RECORD
from gft.stops import STOP_EOS_KEY, write_generation_eos
from gft.quant import copy_base_record, hf_quantization
from gft.lora import (MLX_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, LoraConfig, is_mlx_adapter,
                      is_peft_adapter, mlx_config, mlx_key, parse_mlx_key, parse_peft_key,
                      peft_key, read_mlx_config, read_peft_config, write_peft_config)
from gft.weights import DEFAULT_SHARD_SIZE, DTYPES, arrays, load_weights, write_model


# ------------------------------------------------------------------ models

def convert_model(src: Path, dst: Path, *, dtype: str | None, shard_size: str | int,
                  framework: str | None = None) -> list[str]:
    from gft.quant import describe, describe_hf, hf_quantization, mlx_quantization
    cfg = _read_config(src)
    q = mlx_quantization(cfg)
    if q is not None:
        raise ModelError(f"{src}: an mlx-lm quantized model ({describe(q)}); to write it in "
                         "full precision add --dequantize")
    if hf_quantization(cfg) is not None:
        raise ModelError(f"{src}: quantized by transformers ({describe_hf(hf_quantization(cfg))}); "
                         "add --dequantize to write it in floating point")
    ar = arrays(framework)
    tensors = load_weights(src, ar)
    if dtype:
        tensors = {k: ar.cast(v, dtype) if ar.is_float(v) else v for k, v in tensors.items()}
    warnings = write_model(dst, src, tensors, ar, shard_size)
    kinds = sorted({ar.dtype(v) for v in tensors.values()})
    return [f"wrote {dst}: {len(tensors)} tensors ({', '.join(kinds)})"] + [
        f"warning: {w}" for w in warnings]


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the model config: {e}") from None


def _num_layers(base: str | None) -> int | None:
    """The base model's depth, when it is a local directory."""
    if base and (Path(base) / "config.json").is_file():
        return _read_config(Path(base)).get("num_hidden_layers")
    return None


# ------------------------------------------------------------------ adapters

def read_adapter(src: Path, ar) -> tuple[LoraConfig, str | None, dict[str, tuple[Any, Any]]]:
    """(LoRA, base, {module: (A [r, in], B [out, r])}) of a PEFT or an mlx-lm adapter."""
    if is_peft_adapter(src):
        lora, base = read_peft_config(src)
        raw, parse, transpose = ar.load(src / PEFT_WEIGHTS), parse_peft_key, False
    elif is_mlx_adapter(src):
        params, base = read_mlx_config(src)
        rank, scale = int(params["rank"]), float(params["scale"])
        raw, parse, transpose = ar.load(src / MLX_WEIGHTS), parse_mlx_key, True
        lora = LoraConfig(rank, scale * rank, float(params.get("dropout", 0.0)),
                          tuple(params.get("keys") or ()))
    else:
        raise ModelError(f"{src}: not a LoRA adapter directory (adapter_config.json with "
                         f"{PEFT_WEIGHTS} or {MLX_WEIGHTS})")
    pairs: dict[str, dict[str, Any]] = {}
    for key, x in raw.items():
        module, which = parse(key)
        pairs.setdefault(module, {})[which] = ar.t(x) if transpose else x
    missing = [m for m, ab in pairs.items() if set(ab) != {"A", "B"}]
    if missing:
        raise ModelError(f"{src}: adapter for {missing[0]} lacks its lora_A or lora_B")
    return lora, base, {m: (ab["A"], ab["B"]) for m, ab in pairs.items()}


def read_adapter_base(src: Path) -> str | None:
    """The base model an adapter names, without reading its tensors."""
    if is_peft_adapter(src):
        return read_peft_config(src)[1]
    if is_mlx_adapter(src):
        return read_mlx_config(src)[1]
    raise ModelError(f"{src}: not a LoRA adapter directory (adapter_config.json with "
                     f"{PEFT_WEIGHTS} or {MLX_WEIGHTS})")


def write_adapter(dst: Path, to: str, lora: LoraConfig, base: str | None,
                  modules: dict[str, tuple[Any, Any]], ar) -> None:
    """PEFT: lora's own config; mlx-lm: keys and num_layers derived from `modules`."""
    dst.mkdir(parents=True, exist_ok=True)
    if to == "peft":
        write_peft_config(dst, lora, base)
        tensors = {peft_key(m, w): x for m, ab in modules.items() for w, x in zip("AB", ab)}
        ar.save(dst / PEFT_WEIGHTS, tensors, {"format": "pt"})
    else:
        cfg = mlx_config(lora, sorted(modules), _num_layers(base), base)
        tensors = {mlx_key(m, w): ar.t(x) for m, ab in modules.items() for w, x in zip("AB", ab)}
        (dst / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        ar.save(dst / MLX_WEIGHTS, tensors, {"format": "mlx"})


def peft_targets(lora: LoraConfig, modules: list[str], base: str | None) -> LoraConfig:
    """PEFT target_modules for an mlx-lm adapter: mlx-lm's keys when it covers every layer
    of the base model (PEFT matches them as path suffixes), else the exact module paths."""
    n_layers = _num_layers(base)
    cfg = mlx_config(lora, modules, n_layers, base)  # also checks mlx-lm's layer pattern
    every = n_layers is not None and cfg["num_layers"] == n_layers
    targets = cfg["lora_parameters"]["keys"] if every else sorted(modules)
    return LoraConfig(lora.rank, lora.alpha, lora.dropout, tuple(targets))


def convert_adapter(src: Path, dst: Path, *, to: str | None, dtype: str | None,
                    base: str | None, framework: str | None = None) -> list[str]:
    ar = arrays(framework)
    lora, stored_base, modules = read_adapter(src, ar)
    base = base or stored_base
    to = to or ("mlx-lm" if is_peft_adapter(src) else "peft")
    if to == "mlx-lm" and lora.fan_in_fan_out:
        raise ModelError(f"{src}: the adapter is over weights stored [in, out] (fan_in_fan_out: "
                         "GPT-2's Conv1D layers), an architecture gft does not train on MLX; "
                         "it stays a PEFT adapter")
    if to == "peft" and is_mlx_adapter(src):
        lora = peft_targets(lora, sorted(modules), base)
    if dtype:
        modules = {m: (ar.cast(a, dtype), ar.cast(b, dtype)) for m, (a, b) in modules.items()}
    write_adapter(dst, to, lora, base, modules, ar)
    copy_base_record(src, dst)  # the base's quantization and the prompts' format travel
    if (src / MODEL_RECORD).is_file():
        shutil.copyfile(src / MODEL_RECORD, dst / MODEL_RECORD)
    lines = [f"wrote {dst}: {to} adapter, rank {lora.rank}, scale {lora.scale:g}, "
             f"{len(modules)} modules"]
    if to == "mlx-lm":
        lines += mlx_lm_misreads(base, src)
    return lines


@contextmanager
def peft_view(model_path: str, base: str | None = None) -> Iterator[str]:
    """model_path, or for an mlx-lm adapter folder (mlx_lm.lora's adapters.safetensors +
    adapter_config.json) a PEFT copy of it in a temporary folder, for the time of the
    block: the backends load PEFT adapters, and convert_adapter writes one exactly
    (what `gft convert ADAPTER OUT --to peft` does). So `--model ADAPTER` trains on from
    the adapter, and gft generate/eval sample from it. A base it names that is not on this
    machine is one line naming the adapter's own file (`base`: the base given instead)."""
    if not is_mlx_adapter(model_path):
        yield model_path
        return
    src = Path(model_path)
    named = read_mlx_config(src)[1]
    # found nowhere (mlx_adapter_base): missing, unless written as a hub id ('org/name');
    # a bare name such as mlx_lm.lora's `--model base` is a folder, not a hub lookup
    hub_id = named and re.fullmatch(r"[\w.-]+/[\w.-]+", named) and not Path(named).exists()
    if base is None and (not named or not hub_id and not Path(named).expanduser().exists()):
        where = f"model '{named}' is not on this machine" if named else "names no model"
        raise ModelError(f"{src / PEFT_CONFIG}: {where} (the base mlx_lm.lora trained over); "
                         f"pass it with --base PATH, or write a PEFT copy that names it: gft "
                         f"convert {src} OUT --to peft --base PATH")
    with tempfile.TemporaryDirectory(prefix="gft-mlx-adapter-") as tmp:
        out = Path(tmp) / src.name
        convert_adapter(src, out, to="peft", dtype=None, base=base or named)
        yield str(out)


# config.json keys mlx-lm 0.32 reads only at the top level (gft/modelfiles.py).
_MLX_LM_KEYS = ("rope_theta", "rope_scaling", "tie_word_embeddings")


def mlx_lm_misreads(base: str | None, adapter: Path) -> list[str]:
    """A warning when mlx-lm alone reads the base's config.json otherwise than
    transformers (and gft's training on either backend) does: the adapter then runs in
    another model under mlx_lm.load(base, adapter_path=...). The base is the user's and is
    not changed; a fused model carries a config both read alike."""
    if not base or not (Path(base) / "config.json").is_file():
        return []
    from gft.modelfiles import portable_config
    raw, (read, _) = _read_config(Path(base)), portable_config(Path(base))
    # rope_scaling only when absent: its legacy spelling ("type") reads the same
    differ = [f"{k} {'absent' if k not in raw else repr(raw[k])} (transformers: {read[k]!r})"
              for k in _MLX_LM_KEYS if read.get(k) is not None and (
                  k not in raw or (k != "rope_scaling" and raw[k] != read[k]))]
    if not differ:
        return []
    return [f"warning: {Path(base) / 'config.json'}: {', '.join(differ)}: mlx-lm reads it "
            "with its own defaults, so mlx_lm.load of this base with the adapter computes "
            f"another model than the one trained; gft fuse {adapter} OUT (--requantize over "
            "a quantized base) writes one mlx-lm reads as trained"]


def convert(src: str | Path, dst: str | Path, *, dtype: str | None = None,
            shard_size: str | int | None = None, to: str | None = None,
            base: str | None = None, framework: str | None = None,
            quantize: int | None = None, group_size: int | None = None,
            dequantize: bool = False) -> list[str]:
    """`gft convert`: a model directory or an adapter; returns the lines to print.
    quantize (bits) / dequantize: to and from mlx-lm's quantized format (gft/quantize.py)."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dst.exists() and (dst.resolve() == src.resolve() or any(dst.iterdir())):
        raise ConfigError(f"{dst}: the destination must be a new or empty directory")
    quant_opts = quantize is not None or group_size is not None or dequantize
    from gft.hf_formats import convert_gguf
    from gft.modelfiles import is_gguf
    if is_gguf(src):
        if to is not None or quant_opts:
            raise ConfigError(f"{src}: a GGUF file converts to a full-precision model "
                              "directory first (--dtype, --shard-size); quantize that "
                              "directory for mlx-lm with a second gft convert --quantize")
        return convert_gguf(src, dst, dtype=dtype, shard_size=shard_size or DEFAULT_SHARD_SIZE)
    if is_peft_adapter(src) or is_mlx_adapter(src):
        if shard_size is not None or quant_opts:
            raise ConfigError("--shard-size, --quantize, --group-size and --dequantize apply "
                              "to models, not adapters")
        return convert_adapter(src, dst, to=to, dtype=dtype, base=base, framework=framework)
    if to is not None:
        raise ConfigError(f"{src}: --to converts adapters; this is a model directory")
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: neither a model directory (config.json) nor an adapter")
    shard_size = shard_size or DEFAULT_SHARD_SIZE
    if quant_opts:
        from gft import quantize as q
        if dequantize:
            if quantize is not None or group_size is not None:
                raise ConfigError("choose --quantize or --dequantize, not both")
            hf = hf_quantization(_read_config(src))
            if hf is not None:
                from gft.hf_formats import dequantize_hf
                from gft.quant import describe_hf
                return dequantize_hf(src, dst, method=describe_hf(hf), dtype=dtype,
                                     shard_size=shard_size)
            return q.dequantize_dir(src, dst, dtype=dtype, shard_size=shard_size)
        if quantize is None:
            raise ConfigError("--group-size goes with --quantize 4|8")
        return q.quantize_dir(src, dst, bits=quantize, group_size=group_size, dtype=dtype,
                              shard_size=shard_size)
    return convert_model(src, dst, dtype=dtype, shard_size=shard_size, framework=framework)


def fuse(adapter: str | Path, out: str | Path, *, base: str | None = None,
         dtype: str | None = None, shard_size: str | int | None = None,
         framework: str | None = None, requantize: bool = False) -> list[str]:
    """`gft fuse`: the base model with W + s·B·A in every adapted weight, as a portable
    model directory. Over an mlx-lm quantized base: de-quantized, or (requantize)
    quantized again as the base was (gft/quantize.py)."""
    from gft.quant import describe_hf, hf_quantization, mlx_quantization, read_base_record
    adapter, out = Path(adapter), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: the destination must be a new or empty directory")
    base_dir = Path(base or read_adapter_base(adapter) or "")
    if not (base_dir / "config.json").is_file():
        raise ModelError(f"{base_dir}: base model directory not found; pass --base")
    base_config = _read_config(base_dir)
    if hf_quantization(base_config) is not None:
        raise ModelError(f"{base_dir}: quantized by transformers "
                         f"({describe_hf(hf_quantization(base_config))}); gft fuse adds "
                         "s·B·A to full-precision weights: name the full-precision model "
                         "the quantized one was made from with --base DIR")
    quantized = mlx_quantization(base_config) is not None
    if requantize and not quantized:
        raise ConfigError(f"{base_dir}: not a quantized model; --requantize applies to "
                          "adapters over mlx-lm quantized bases")
    record = read_base_record(adapter)
    note = ([f"note: the adapter was trained over {record.get('base_model') or 'a base'}, "
             f"{record['description']}; fused into {base_dir}, which is not quantized"]
            if record and not quantized else [])
    ar = arrays("mlx" if quantized else framework)
    lora, stored_base, modules = read_adapter(adapter, ar)
    if quantized:
        from gft.quantize import fuse_quantized
        lines = fuse_quantized(base_dir, out, modules, lora.scale, requantize=requantize,
                               dtype=dtype, shard_size=shard_size or DEFAULT_SHARD_SIZE)
        _carry_record(adapter, out)
        return lines
    weights = load_weights(base_dir, ar)
    for module, (a, b) in modules.items():
        name = module + ".weight"
        if name not in weights:
            raise ModelError(f"{base_dir}: the adapter adapts '{module}', which has no weight "
                             "in the base model (tied embeddings?)")
        if lora.fan_in_fan_out:  # W stored [in, out] (GPT-2's Conv1D): add (B·A)^T = A^T·B^T
            a, b = ar.t(b), ar.t(a)
        if tuple(weights[name].shape) != (b.shape[0], a.shape[1]):
            raise ModelError(f"{base_dir}: '{name}' has shape {tuple(weights[name].shape)}, the "
                             f"adapter's update {(b.shape[0], a.shape[1])}; is {adapter} an "
                             "adapter of this base?")
        weights[name] = ar.fuse(weights[name], a, b, lora.scale, dtype)  # one rounding
    if dtype:
        weights = {k: ar.cast(v, dtype) if ar.is_float(v) else v for k, v in weights.items()}
    warnings = write_model(out, base_dir, weights, ar, shard_size or DEFAULT_SHARD_SIZE)
    _carry_record(adapter, out)
    return [f"wrote {out}: {len(modules)} adapted weights fused into {base_dir}"] + note + [
        f"warning: {w}" for w in warnings]


def _carry_record(adapter: Path, out: Path) -> None:
    """The adapter's gft.json (how its run rendered prompts) into the fused model, in place
    of any the base had: the fused model is used as the adapter was trained. Its run's
    one-token stops join the fused generation_config.json's eos ids, as a full model's
    checkpoint lists them (gft/stops.py): an adapter folder has no generation config, so
    transformers and mlx-lm would run on past where the run's rollouts ended."""
    from gft.trained import trained_stop
    from gft.stops import generation_eos_ids, model_stops, own_eos_ids
    stop = trained_stop(str(adapter))
    stops = None
    # the base's own eos ids, read while its gft.json (the ids its run added, which the
    # adapter's run did not stop at unless its own stop says so) is there
    if (stop or own_eos_ids(out) != generation_eos_ids(out)) and \
            (out / "generation_config.json").is_file():
        from gft.modelfiles import load_tokenizer
        stops = model_stops(load_tokenizer(str(out)), out, stop)
    if (adapter / MODEL_RECORD).is_file():
        shutil.copyfile(adapter / MODEL_RECORD, out / MODEL_RECORD)
    elif (out / MODEL_RECORD).is_file():  # the base's, from another run
        (out / MODEL_RECORD).unlink()
    if stops is not None and write_generation_eos(out, stops) and stops.added \
            and (out / MODEL_RECORD).is_file():
        record = json.loads((out / MODEL_RECORD).read_text(encoding="utf-8"))
        (out / MODEL_RECORD).write_text(json.dumps({**record, STOP_EOS_KEY: list(
            stops.added)}, indent=2) + "\n", encoding="utf-8")
