"""LoRA, backend-neutral: the config, the adapter formats, and the names both backends share.

A LoRA layer adds a low-rank update to a frozen linear map W [out, in]:

    y = W x + s · B (A dropout(x)),   A [r, in], B [out, r],   s = alpha / r

One neutral form, the PEFT one, is used everywhere a tensor leaves a backend: in the
adapter files of a checkpoint, in the optimizer state (`exp_avg.<name>`), in
`named_parameters()` and `gradients()`. So a LoRA run moves between torch and MLX like a
full fine-tune does.

    PEFT   (adapter_config.json + adapter_model.safetensors; what gft writes)
        base_model.model.<module>.lora_A.weight   [r, in]
        base_model.model.<module>.lora_B.weight   [out, r]
        adapter_config.json: r, lora_alpha, lora_dropout, target_modules, ...
    mlx-lm (adapter_config.json + adapters.safetensors; read and written by `gft convert`)
        <module>.lora_a   [in, r]   = A^T
        <module>.lora_b   [r, out]  = B^T
        adapter_config.json: fine_tune_type, num_layers (the last N decoder layers),
        lora_parameters {rank, scale = s, dropout, keys (module paths inside a layer)}

Deliberate choices:
- A is initialised here, with NumPy, from (seed, module name): U(-1/sqrt(in), 1/sqrt(in)),
  the bound of both PEFT's kaiming_uniform(a=sqrt(5)) and mlx-lm's init; B = 0. So a LoRA
  run starts from the same adapter on either backend (as the full model does, gft/tiny.py).
- rsLoRA, DoRA, per-module rank/alpha patterns and LoRA biases are not supported: an
  adapter using them is refused with a one-line error rather than converted wrongly.
No torch and no mlx here: tensors are moved by the backends and by gft/convert.py.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gft.errors import ConfigError, ModelError
from gft.runpaths import adapter_base, base_for_adapter, looks_local

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_WEIGHTS = "adapters.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MLX_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[ab])$")
_LAYER = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<rel>.+)$")


@dataclass(frozen=True)
class LoraConfig:
    """Which linear layers get an adapter, and its shape. scale = alpha / rank."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # the adapted weights are stored [in, out] (GPT-2's Conv1D), so W' = W + s·(B·A)^T;
    # peft sets it when it meets such a layer
    fan_in_fan_out: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, module: str) -> bool:
        """PEFT's rule for a list of target names: the path equals one or ends with '.name'."""
        return any(self.matches_one(module, t) for t in self.targets)

    @staticmethod
    def matches_one(module: str, target: str) -> bool:
        return module == target or module.endswith("." + target)


def check_targets(lora: LoraConfig, linear_names: list[str]) -> None:
    """Every target must name at least one linear layer (PEFT's rule, LoraConfig.matches):
    gft trains LoRA on linear layers only, so a target such as 'embed_tokens' (or a typo)
    would otherwise be skipped in silence while the others train (peft's 'all-linear'
    shorthand is not one of gft's targets: name the layers)."""
    missing = [t for t in lora.targets if not any(lora.matches_one(n, t) for n in linear_names)]
    if missing:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ModelError(f"LoRA target(s) {missing} match no linear layer of the model; gft "
                         f"trains LoRA on linear layers ({', '.join(kinds[:12])})")


def lora_from_train_config(cfg) -> LoraConfig | None:
    """The LoRA a TrainConfig asks for (lora_rank 0 = none)."""
    rank = getattr(cfg, "lora_rank", 0)
    if not rank:
        return None
    if rank < 0 or cfg.lora_alpha <= 0 or not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError("LoRA needs lora_rank >= 1, lora_alpha > 0 and lora_dropout in [0, 1)")
    targets = cfg.lora_targets
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"'lora_targets' must be a list of module names, got {cfg.lora_targets!r}")
    return LoraConfig(int(rank), float(cfg.lora_alpha), float(cfg.lora_dropout), tuple(targets))


# ------------------------------------------------------------------ names

def peft_key(module: str, which: str) -> str:
    """PEFT file key of a module's A or B matrix."""
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def parse_peft_key(key: str) -> tuple[str, str]:
    """(module path, 'A' or 'B') of a PEFT adapter key; ModelError for anything else."""
    match = _PEFT_KEY.match(key)
    if match is None:
        raise ModelError(f"'{key}' is not a LoRA tensor of a PEFT adapter (lora_A / lora_B "
                         "weights only: LoRA biases, DoRA and modules_to_save are not supported)")
    return match["module"], match["ab"]


def mlx_key(module: str, which: str) -> str:
    return f"{module}.lora_{which.lower()}"


def parse_mlx_key(key: str) -> tuple[str, str]:
    match = _MLX_KEY.match(key)
    if match is None:
        raise ModelError(f"'{key}' is not a LoRA tensor of an mlx-lm adapter (lora_a / lora_b "
                         "only: DoRA and full fine-tunes are not supported)")
    return match["module"], match["ab"].upper()


def init_lora_a(module: str, rank: int, in_features: int, seed: int) -> np.ndarray:
    """A [r, in] for one module, float32, the same on every backend and machine."""
    rng = np.random.default_rng([seed, zlib.crc32(module.encode())])
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


# ------------------------------------------------------------------ PEFT adapter_config.json

def peft_config(lora: LoraConfig, base: str | None) -> dict[str, Any]:
    """The adapter_config.json PEFT writes for this LoRA (the keys that matter, the rest
    left to PEFT's defaults). peft.PeftModel.from_pretrained reads it."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.targets), "bias": "none", "fan_in_fan_out": lora.fan_in_fan_out,
        "use_rslora": False, "use_dora": False, "lora_bias": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def read_peft_config(adapter_dir: Path) -> tuple[LoraConfig, str | None]:
    """(LoraConfig, base model) of a PEFT adapter directory; ModelError for what gft
    cannot represent (it would otherwise compute something else than PEFT)."""
    path = Path(adapter_dir) / PEFT_CONFIG
    raw = _read_object(path)
    if raw.get("peft_type", "LORA") != "LORA" or "fine_tune_type" in raw:
        raise ModelError(f"{path}: not a PEFT LoRA adapter config")
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if raw.get(key):
            raise ModelError(f"{path}: '{key}' adapters are not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise ModelError(f"{path}: per-module '{key}' is not supported")
    if raw.get("modules_to_save") or raw.get("layers_to_transform") is not None:
        raise ModelError(f"{path}: modules_to_save / layers_to_transform are not supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):  # a regex over module paths in PEFT: not a list of names
        raise ModelError(f"{path}: target_modules given as a regex is not supported")
    if not isinstance(targets, (list, type(None))) or not all(
            isinstance(t, str) for t in targets or ()):
        raise ModelError(f"{path}: 'target_modules' must be a list of module names, got "
                         f"{targets!r}")
    lora = LoraConfig(_field(path, raw, "r", int, None), _field(path, raw, "lora_alpha", float, 8),
                      _field(path, raw, "lora_dropout", float, 0.0), tuple(targets or ()),
                      fan_in_fan_out=raw.get("fan_in_fan_out") is True)
    base = _base_name(path, raw, "base_model_name_or_path")
    return lora, adapter_base(base, Path(adapter_dir)) if base else base


def _field(path: Path, raw: dict, key: str, kind: type, default: Any) -> Any:
    """raw[key] as `kind` (an int is fine for a float), or a ModelError naming it."""
    value = raw.get(key, default)
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (kind is int and value < 1) or (kind is float and not math.isfinite(value)):
        what = "positive integer" if kind is int else "finite number"
        raise ModelError(f"{path}: '{key}' must be a {what}, got {value!r}")
    return kind(value)


def _base_name(path: Path, raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise ModelError(f"{path}: '{key}' must be a path or hub id, got {value!r}")
    return value or None


def _read_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: unreadable adapter config: {e}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: must be a JSON object (key: value), got a "
                         f"{type(raw).__name__}")
    return raw


def is_peft_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / PEFT_CONFIG).is_file() and (path / PEFT_WEIGHTS).is_file()


def is_mlx_adapter(path: str | Path) -> bool:
    path = Path(path)
    return (path / PEFT_CONFIG).is_file() and (path / MLX_WEIGHTS).is_file()


def resolve_adapter(model_path: str, base: str | None,
                    lora: LoraConfig | None) -> tuple[str, str | None, LoraConfig | None]:
    """(base model, adapter dir or None, LoRA) for what a backend was asked to load.

    A PEFT adapter directory (a LoRA checkpoint) loads its base model: `base` when given
    (a resumed run's `model`, which may have moved between machines), else the adapter's
    base_model_name_or_path. Its shape comes from the adapter; a training config that asks
    for another shape is an error, not a silent reshape."""
    if not is_peft_adapter(model_path):
        if is_mlx_adapter(model_path):
            raise ModelError(f"{model_path}: an mlx-lm adapter; make it a PEFT one first: "
                             f"gft convert {model_path} OUT --to peft")
        return model_path, None, lora
    stored, stored_base = read_peft_config(Path(model_path))
    if not (base or stored_base):
        raise ModelError(f"{model_path}: the adapter names no base model; pass it with --base PATH")
    if not base and looks_local(stored_base) and not Path(stored_base).expanduser().exists():
        raise ModelError(f"{Path(model_path) / PEFT_CONFIG}: base_model_name_or_path "
                         f"'{stored_base}' is not on this machine; pass it with --base PATH")
    base = base or stored_base
    if lora is not None and (lora.rank, lora.alpha, sorted(lora.targets)) != (
            stored.rank, stored.alpha, sorted(stored.targets)):
        raise ConfigError(f"{model_path}: the adapter has rank {stored.rank}, alpha "
                          f"{stored.alpha}, targets {sorted(stored.targets)}; the config asks for "
                          f"rank {lora.rank}, alpha {lora.alpha}, targets {sorted(lora.targets)}")
    return base, model_path, lora or stored


def write_peft_config(path: Path, lora: LoraConfig, base: str | None) -> None:
    """base: as the user gave it (a hub id stays one); a base inside the adapter's run
    directory is stored relative to the adapter, so the run can move (gft/runpaths.py)."""
    config = peft_config(lora, base_for_adapter(base, Path(path)))
    (Path(path) / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------ mlx-lm adapter_config.json

def mlx_config(lora: LoraConfig, modules: list[str], n_layers: int | None,
               base: str | None) -> dict[str, Any]:
    """mlx-lm's adapter_config.json for adapters on exactly `modules`.

    mlx-lm puts adapters on the modules named by `keys` (paths inside a decoder layer, or
    full paths outside the layers) in the last `num_layers` layers, so the modules must
    be the same in every adapted layer and those layers the last ones of the model
    (`n_layers`, the base model's depth; None = assume the adapter reaches the last layer)."""
    by_layer: dict[int, set[str]] = {}
    outside: set[str] = set()
    for module in modules:
        match = _LAYER.match(module)
        if match is None:
            outside.add(module)
        else:
            by_layer.setdefault(int(match["index"]), set()).add(match["rel"])
    rels = {frozenset(v) for v in by_layer.values()}
    if len(rels) > 1:
        raise ModelError("the adapter targets different modules in different layers; mlx-lm "
                         "adapts the same modules in each of its last num_layers layers")
    layers = sorted(by_layer)
    total = n_layers if n_layers is not None else (layers[-1] + 1 if layers else 0)
    if layers and layers != list(range(total - len(layers), total)):
        raise ModelError(f"the adapter covers layers {layers} of {total}; mlx-lm can only "
                         "adapt the last num_layers layers")
    keys = sorted(next(iter(rels))) if rels else []
    return {"fine_tune_type": "lora", "num_layers": len(layers), "model": base,
            "lora_parameters": {"rank": lora.rank, "scale": lora.scale,
                                "dropout": lora.dropout, "keys": keys + sorted(outside)}}


def read_mlx_config(adapter_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(lora_parameters, base model) of an mlx-lm adapter directory."""
    path = Path(adapter_dir) / PEFT_CONFIG
    raw = _read_object(path)
    if raw.get("fine_tune_type", "lora") != "lora":
        raise ModelError(f"{path}: fine_tune_type '{raw.get('fine_tune_type')}' is not "
                         "supported (LoRA only)")
    params = raw.get("lora_parameters") or {}
    if not isinstance(params, dict) or "rank" not in params or "scale" not in params:
        raise ModelError(f"{path}: lora_parameters needs 'rank' and 'scale'")
    _field(path, params, "rank", int, None)
    _field(path, params, "scale", float, None)
    return params, mlx_adapter_base(Path(adapter_dir), raw)


def mlx_adapter_base(adapter_dir: Path, raw: dict[str, Any]) -> str | None:
    """The base an mlx-lm adapter names. mlx_lm.lora writes its --model as typed, relative
    to the directory it ran in, beside its --adapter-path (adapter_path) typed the same
    way: so a relative model is looked up from that directory (the adapter folder's path
    with adapter_path taken off its end), then from the working directory (as mlx-lm
    itself reads it), then from the adapter folder; found nowhere, it is kept as
    written (a hub id, or a path that resolve_adapter reports missing)."""
    stored = _base_name(Path(adapter_dir) / PEFT_CONFIG, raw, "model")
    if not stored or Path(stored).expanduser().is_absolute():
        return stored
    here = Path(adapter_dir).resolve()
    places = [Path.cwd(), here]
    written = raw.get("adapter_path")
    if isinstance(written, str) and written and not Path(written).is_absolute():
        parts = Path(written).parts
        if ".." not in parts and here.parts[-len(parts):] == parts:
            places.insert(0, Path(*here.parts[:-len(parts)]))  # where mlx_lm.lora ran
    for place in places:
        if (place / stored / "config.json").is_file():
            return str((place / stored).resolve())
    return stored
