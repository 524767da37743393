"""LoRA on the MLX backend, with mlx-lm's layers (`mlx_lm.tuner.utils.linear_to_lora_layers`,
which wraps each targeted linear in `mlx_lm.tuner.lora.LoRALinear`).

mlx-lm stores an adapter as lora_a [in, r] and lora_b [r, out] under the module path
(`model.layers.0.self_attn.q_proj.lora_a`); everything that leaves this backend uses the
neutral PEFT names and orientation of gft/lora.py instead (`to_neutral` / `from_neutral`:
a rename and a transpose, exact for weights and for AdamW moments alike).
The base model is frozen first, so only the adapters are trainable; they stay float32 on a
bfloat16 model, as peft keeps them.
A quantized base (mlx-lm's 4- or 8-bit QuantizedLinear / QuantizedEmbedding, any group size
or per-layer recipe) is frozen the same way: mlx-lm's LoRALinear wraps a QuantizedLinear
as it wraps a Linear, so rollouts and the update both run through the quantized matmul.
"""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gft.errors import ModelError
from gft.lora import (PEFT_WEIGHTS, LoraConfig, check_targets, init_lora_a, mlx_key,
                      parse_mlx_key, parse_peft_key, peft_key, write_peft_config)


def to_neutral(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """{module.lora_a: [in, r]} -> {base_model.model.module.lora_A.weight: [r, in]}."""
    return {peft_key(*parse_mlx_key(n)): x.T for n, x in tensors.items()}


def from_neutral(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    return {mlx_key(*parse_peft_key(n)): x.T for n, x in tensors.items()}


def target_keys(model: nn.Module, lora: LoraConfig) -> list[str]:
    """Full module paths of the targeted linears, by PEFT's rule over full paths: a target
    matches a path that equals it or ends with '.target'. So a target may be a name
    ('q_proj'), a path inside a layer ('self_attn.q_proj') or one module
    ('model.layers.23.self_attn.q_proj': how PEFT, and gft convert for an mlx-lm adapter
    on the last num_layers layers, name adapters that cover only some layers).
    Full paths, not mlx-lm's paths inside a layer: linear_to_lora_layers wraps the modules
    its `keys` name anywhere in the model, so only the named layers get an adapter."""
    linear = (nn.Linear, nn.QuantizedLinear)
    names = [name for name, m in model.named_modules() if isinstance(m, linear)]
    check_targets(lora, names)
    return sorted(name for name in names if lora.matches(name))


def apply_lora(model: nn.Module, lora: LoraConfig, seed: int, adapter: str | None = None) -> None:
    """Freeze the model, wrap the targeted linears, then set the adapters: fresh
    (A from gft.lora.init_lora_a, B = 0) or the adapter directory's (PEFT format)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {
        "rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout,
        "keys": target_keys(model, lora)})
    current = dict(tree_flatten(model.trainable_parameters()))
    if adapter is not None:
        loaded = from_neutral(mx.load(str(Path(adapter) / PEFT_WEIGHTS)))
        if set(loaded) != set(current):
            extra = sorted(set(loaded) ^ set(current))[:3]
            raise ModelError(f"{adapter}: the adapter's tensors do not match the model's LoRA "
                             f"layers (e.g. {extra})")
        for name, x in loaded.items():
            if x.shape != current[name].shape:
                raise ModelError(f"{adapter}: {name} has shape {tuple(x.shape)}, the model's "
                                 f"is {tuple(current[name].shape)}")
        new = {n: x.astype(mx.float32) for n, x in loaded.items()}
    else:
        new = {}
        for name, x in current.items():
            module, which = parse_mlx_key(name)
            new[name] = (mx.array(init_lora_a(module, lora.rank, x.shape[0], seed).T)
                         if which == "A" else mx.zeros(x.shape, dtype=mx.float32))
    model.update(tree_unflatten(list(new.items())))
    mx.eval(model.parameters())


def save_adapter(path: Path, params: dict[str, mx.array], lora: LoraConfig, base: str,
                 name: str | None = None) -> None:
    """The PEFT adapter directory the torch backend writes for the same weights, plus a
    record of the base's quantization when it is quantized (gft/quant.py). `name`: how
    the adapter names its base when not as the folder `base` (a hub id read from its
    local snapshot)."""
    from gft.quant import base_record, write_base_record
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_peft_config(path, lora, name or base)
    record = base_record(base)
    write_base_record(path, {**record, "base_model": name} if record and name else record)
    tensors = {n: mx.contiguous(x) for n, x in to_neutral(params).items()}
    mx.save_safetensors(str(path / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
