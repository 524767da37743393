"""LoRA on the torch backend, through peft (`get_peft_model` with a `LoraConfig`).

peft freezes the base model, so the backend's optimizer sees only the adapters. Its
parameter names (`...q_proj.lora_A.default.weight`) are renamed to the neutral ones of
gft/lora.py (the PEFT file keys, `...q_proj.lora_A.weight`), which the optimizer file,
named_parameters() and gradients() use on both backends. A (B = 0) is overwritten with
gft.lora.init_lora_a so that torch and MLX LoRA runs start from the same adapter.
peft keeps adapters in float32 on a bfloat16 model (autocast_adapter_dtype); so does MLX.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gft.errors import ConfigError, ModelError
from gft.lora import PEFT_WEIGHTS, LoraConfig, init_lora_a, parse_peft_key, write_peft_config

_ADAPTER_NAME = re.compile(r"\.lora_([AB])\.default\.weight$")


def neutral_name(name: str) -> str:
    """peft's in-memory name -> the PEFT file key (the adapter name dropped)."""
    return _ADAPTER_NAME.sub(r".lora_\1.weight", name)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {neutral_name(n): p for n, p in model.named_parameters() if _ADAPTER_NAME.search(n)}


def apply_lora(model, lora: LoraConfig, seed: int, adapter: str | None = None):
    """The peft-wrapped model with fresh adapters, or the adapter directory's weights."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("LoRA on the torch backend needs peft: pip install peft") from None
    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.targets), bias="none",
                              task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. no module matches the targets
        raise ModelError(f"LoRA targets {list(lora.targets)}: {str(e).splitlines()[0]}") from None
    params = lora_parameters(model)
    if adapter is not None:
        load_adapter(params, Path(adapter))
    else:
        with torch.no_grad():
            for name, p in params.items():
                module, which = parse_peft_key(name)
                if which == "A":
                    p.copy_(torch.from_numpy(init_lora_a(module, lora.rank, p.shape[1], seed)))
    return model  # (peft itself gives checkpointed layers a gradient path past frozen embeddings)


def load_adapter(params: dict[str, torch.nn.Parameter], adapter: Path) -> None:
    tensors = load_file(str(adapter / PEFT_WEIGHTS))
    if set(tensors) != set(params):
        extra = sorted(set(tensors) ^ set(params))[:3]
        raise ModelError(f"{adapter}: the adapter's tensors do not match the model's LoRA "
                         f"layers (e.g. {extra})")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ModelError(f"{adapter}: {name} has shape {tuple(tensors[name].shape)}, "
                                 f"the model's is {tuple(p.shape)}")
            p.copy_(tensors[name].to(p.dtype))


def save_adapter(path: Path, params: dict[str, torch.nn.Parameter], lora: LoraConfig,
                 base: str) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_peft_config(path, lora, base)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()},
              str(path / PEFT_WEIGHTS), metadata={"format": "pt"})
