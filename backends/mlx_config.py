"""How the MLX backend reads a model directory: as transformers reads its config.json.

mlx-lm builds a model from config.json's top-level keys, with its own defaults for the
keys that are absent; transformers 5 resolves the same file through its config classes
(defaults per architecture, RoPE under `rope_parameters`). A directory written by
transformers' own save_pretrained therefore builds another model in mlx-lm, silently
(a Llama saved with rope_theta 1e5 trains with 1e4). `mlx_model_config` gives the keys
mlx-lm must be handed (`mlx_lm.utils.load_model(..., model_config=...)`) so that it
builds transformers' model, without touching the user's directory, or refuses in one
line naming the field mlx-lm cannot express.

The reading, in order:
- gft.modelfiles.portable_config: RoPE base and scaling at the top level, tied
  embeddings decided by the stored weights when absent, plus its list of differences no
  config can remove (those are refusals here);
- every field of the mlx-lm ModelArgs class that config.json leaves out takes the value
  transformers resolves for it (e.g. Granite's rope_theta, StarCoder2's and Qwen2's RoPE
  base, Gemma's activation), since mlx-lm's defaults are not transformers';
- RoPE types mlx-lm's rope_utils does not implement are refused;
- an architecture tests/test_archs.py has not measured equal to transformers (one step,
  float32 loss and gradients within 1e-5) is refused unless GFT_MLX_UNVERIFIED=1: mlx-lm
  implements ~90 architectures and each can differ from transformers in ways no config
  key shows (an activation, a norm, the order of an addition), so "mlx-lm loads it" is
  no evidence that it trains the user's model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import os
from typing import Any

from gft.errors import ModelError
from gft.modelfiles import portable_config, uniform_sliding_window
from gft.quant import mlx_load_overrides

# rope_utils.initialize_rope's types (mlx-lm 0.32); "default" is plain RoPE.
MLX_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")

# Architectures where mlx-lm 0.32, handed the config as transformers reads it, still
# computes another model (tests/test_archs.py, one step on a tiny model saved by
# transformers; the field responsible not yet isolated) or fails mid-step: refused.
MEASURED_DIFFERENT = {
    "phi": "mlx-lm's phi gives another loss than transformers' (1.396 vs 1.157 on a tiny model)",
    "seed_oss": "mlx-lm's seed_oss gives another loss than transformers' (1.418 vs 1.520 on a "
                "tiny model)",
    "cohere2": "mlx-lm's cohere2 fails in its forward pass (IndexError) on transformers' layout",
    "falcon_h1": "mlx-lm's falcon_h1 gives the same loss but other gradients than transformers' "
                 "(relative difference 2.4 on a tiny model)",
}

# Measured equal to transformers by tests/test_archs.py's sweep (one SFT step on a tiny
# model saved by transformers: loss and gradients within 1e-5); CI re-measures each.
MLX_VERIFIED = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "granite", "gemma2", "phi3", "olmo2", "cohere",
    "ernie4_5", "exaone", "helium", "internlm3", "ministral3", "nemotron", "smollm3",
    "hunyuan_v1_dense", "iquestcoder",
})
UNVERIFIED_ENV = "GFT_MLX_UNVERIFIED"  # =1: train an unmeasured architecture anyway

# Keys whose transformers value means something else to mlx-lm (or that mlx-lm derives):
# never copied from transformers' reading.
NOT_COPIED = {"rope_scaling", "rope_parameters", "model_type", "quantization",
              "quantization_config", "tie_word_embeddings", "layer_types"}


def mlx_model_config(model_dir: str | Path) -> dict[str, Any]:
    """The config.json keys to hand mlx-lm's load_model so that it builds the model
    transformers builds from `model_dir`; a ModelError names a field it cannot express."""
    model_dir = Path(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    cfg, problems = portable_config(model_dir)
    where = model_dir / "config.json"
    if problems:
        raise ModelError(f"{where}: {problems[0]}; mlx-lm would train another model "
                         "(use --backend torch)")
    if cfg.get("model_type") in MEASURED_DIFFERENT:
        raise ModelError(f"{where}: model_type {cfg['model_type']}: "
                         f"{MEASURED_DIFFERENT[cfg['model_type']]}; use --backend torch")
    rope = cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in MLX_ROPE_TYPES:
        raise ModelError(f"{where}: rope_parameters.rope_type '{kind}' is not implemented by "
                         "mlx-lm; mlx-lm would train another model (use --backend torch)")
    if cfg.get("model_type") not in MLX_VERIFIED and os.environ.get(UNVERIFIED_ENV) != "1":
        raise ModelError(f"{where}: model_type {cfg.get('model_type')} has not been measured "
                         "to train the same model on mlx-lm as on transformers; use "
                         f"--backend torch, or set {UNVERIFIED_ENV}=1 to try MLX anyway")
    tf = _transformers_config(model_dir)
    for name in _mlx_args_fields(cfg):
        # getattr, not to_dict: it also answers transformers' aliases (attribute_map)
        value = getattr(tf, name, None) if tf is not None else None
        if name not in cfg and name not in NOT_COPIED and isinstance(value, _PLAIN):
            cfg[name] = value
        if name == "rope_scaling":  # a required field of some ModelArgs: plain RoPE
            cfg.setdefault(name, None)
    cfg.update({k: None for k in raw if k not in cfg})  # keys portable_config removed
    cfg.update(mlx_load_overrides(raw))  # an mlx-lm quantization under its other name
    return cfg


_PLAIN = (bool, int, float, str, list, dict)


def unslid_window(model_dir: str | Path) -> int | None:
    """The attention window transformers slides over every layer of this model and
    mlx-lm's model does not (gft.modelfiles.uniform_sliding_window: Mistral, Phi-3, which
    mlx-lm's llama and phi3 build as full attention). The two differ only on sequences
    longer than the window, so the backend refuses those (max_positions) instead of the
    model. None: no such window (mlx-lm applies per-layer windows itself: Gemma 2)."""
    tf = _transformers_config(Path(model_dir))
    return uniform_sliding_window(tf) if tf is not None else None


def _transformers_config(model_dir: Path):
    """transformers' config object for the directory (None when it does not know it)."""
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(model_dir))
    except (ImportError, ValueError, KeyError, OSError, TypeError):
        return None


def _mlx_args_fields(cfg: dict[str, Any]) -> list[str]:
    """The fields of the ModelArgs dataclass mlx-lm picks for this config ([] when
    mlx-lm has no such architecture: load_model then says so itself)."""
    from mlx_lm.utils import _get_classes  # load_model's own choice of classes
    try:
        _, args = _get_classes(cfg)
    except (ValueError, KeyError, ImportError, SystemExit):  # olmo's module exits (no hf_olmo)
        return []
    return [f.name for f in dataclasses.fields(args)] if dataclasses.is_dataclass(args) else []


def check_weight_names(parameters: list[str], model_dir: str | Path) -> None:
    """Refuse a model whose mlx-lm parameters are not the stored weights under the same
    names: mlx-lm's `sanitize` stacks or renames them for some architectures (mixture of
    experts: one switch_mlp tensor for all experts), so gradients, optimizer state and
    the checkpoints gft writes would not be transformers' any more."""
    from gft.modelfiles import stored_weight_names
    stored = stored_weight_names(Path(model_dir))
    if not stored:
        return
    new = sorted(set(parameters) - stored)
    if new:
        raise ModelError(f"{model_dir}: mlx-lm holds this model's weights under other names "
                         f"than the directory ({new[0]}, {len(new)} in all); checkpoints would "
                         "not load in transformers (use --backend torch)")
