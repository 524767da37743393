"""LoRA on the torch backend, through peft (`get_peft_model` with a `LoraConfig`).

peft freezes the base model, so the backend's optimizer sees only the adapters. Its
parameter names (`...q_proj.lora_A.default.weight`) are renamed to the neutral ones of
gft/lora.py (the PEFT file keys, `...q_proj.lora_A.weight`), which the optimizer file,
named_parameters() and gradients() use on both backends. A (B = 0) is overwritten with
gft.lora.init_lora_a so that torch and MLX LoRA runs start from the same adapter.
peft keeps adapters in float32 on a bfloat16 model (autocast_adapter_dtype); so does MLX.
QLoRA (load_in_4bit): the base is loaded in 4-bit NF4 by transformers' BitsAndBytesConfig;
peft wraps bitsandbytes' Linear4bit layers as it wraps nn.Linear.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gft.errors import ConfigError, ModelError
from gft.lora import (PEFT_WEIGHTS, LoraConfig, check_targets, init_lora_a, parse_peft_key,
                      write_peft_config)

# peft imports bitsandbytes when it is installed; on an AVX512-BF16 CPU bitsandbytes 0.50
# then warns, on every start, that an optional kernel from the Hugging Face hub is missing
# (its own fallback runs instead), even for runs that quantize nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
    from transformers.pytorch_utils import Conv1D  # GPT-2's linears
    check_targets(lora, [name for name, m in model.named_modules()
                         if isinstance(m, (torch.nn.Linear, Conv1D))])
    peft_cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.targets), bias="none",
                              task_type="CAUSAL_LM", fan_in_fan_out=lora.fan_in_fan_out)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            # GPT-2's Conv1D: peft turns fan_in_fan_out on itself; the saved adapter says so
            warnings.filterwarnings("ignore", "fan_in_fan_out is set to False")
            model = get_peft_model(model, peft_cfg)
    except ValueError as e:  # e.g. no module matches the targets
        raise ModelError(f"LoRA targets {list(lora.targets)}: {str(e).splitlines()[0]}") from None
    no_cpu_repacking(model)
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


def qlora_load_kwargs(dtype: torch.dtype, device: torch.device) -> dict:
    """from_pretrained's arguments for a 4-bit NF4 base (QLoRA, arXiv 2305.14314): 4-bit
    NormalFloat with double quantization, computing in `dtype`; bitsandbytes runs it on CUDA,
    and on CPU from its 0.48 releases."""
    try:
        import bitsandbytes  # noqa: F401  (transformers' own message is a paragraph)
    except ImportError:
        raise ConfigError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype), "device_map": {"": device}}


def no_cpu_repacking(model) -> None:
    """bitsandbytes (0.50) repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel on
    the first eval-mode forward, one way: the repacked layer has no backward, so the
    update after a rollout would fail. Training alternates the two, so keep the trainable
    layout (the layer's own switch)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_adapter(path: Path, params: dict[str, torch.nn.Parameter], lora: LoraConfig,
                 base: str, quantization=None) -> None:
    """adapter_config.json + adapter_model.safetensors, as peft's save_pretrained writes,
    plus a record of the base's quantization when it was loaded quantized (QLoRA) or is a
    quantized checkpoint (gft/quant.py)."""
    from gft.quant import base_record, write_base_record
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_peft_config(path, lora, base)
    record = base_record(base)
    if quantization is not None:  # quantized while loading (QLoRA): the base files are float
        q = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
        q = json.loads(json.dumps(q, default=str))  # enums (a str subclass) and dtypes as text
        bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else ""
        record = {"base_model": str(base), "format": "transformers", "quantization": q,
                  "description": " ".join(filter(None, [q.get("quant_method"), bits,
                                                        q.get("bnb_4bit_quant_type")]))}
    write_base_record(path, record)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()},
              str(path / PEFT_WEIGHTS), metadata={"format": "pt"})
