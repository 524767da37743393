"""Training configuration: one flat dataclass, every field with help.

Values are layered, later layers winning:
  1. the dataclass defaults (the paper's Qwen2.5-Math-1.5B settings, GFT.md),
  2. the preset (`sft`, `dft`, `grpo`, `gft`: K, n, advantage estimator, tau),
  3. the embedded default job's settings, only when neither `model` nor `data` is given,
  4. the YAML file,
  5. command-line overrides.
Unknown keys and bad values raise ConfigError with a did-you-mean suggestion.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from gft.errors import ConfigError
from gft.objective import ADVANTAGE_ESTIMATORS, AGGREGATIONS


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field carrying its help text (shown by `gft train --help-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # ---- model and backend
    model: str | None = _f(None, "Model directory (Hugging Face layout) or hub id; unset = the "
                                 "embedded default, a tiny byte-level Llama built locally.")
    backend: str = _f("auto", "auto | torch | mlx. auto = mlx on Apple silicon, torch elsewhere.")
    device: str = _f("auto", "torch device: auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps.")
    dtype: str = _f("float32", "Weights and compute dtype: float32 or bfloat16.")
    mixed_precision: bool = _f(False, "torch: compute in bfloat16, keep float32 weights, gradients "
                                      "and AdamW moments (autocast; FSDP2's MixedPrecisionPolicy "
                                      "under parallel: fsdp). Needs dtype: float32. For CUDA.")
    trust_remote_code: bool = _f(False, "Allow model code from the model directory (off: only "
                                        "architectures built into transformers/mlx-lm).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    check_memory: bool = _f(True, "Before loading, plan the run's peak memory (gft train "
                                  "--dry-run prints it) and refuse a config that cannot fit "
                                  "the device, naming the key that shrinks the largest item.")
    parallel: str = _f("ddp", "Under torchrun with several processes: ddp (every rank holds the "
                       "model, gradients all-reduced) | fsdp (FSDP2: weights, gradients and AdamW "
                       "moments sharded over the ranks). One process: ignored.")
    # ---- LoRA (gft/lora.py)
    lora_rank: int = _f(0, "LoRA rank; 0 = train the whole model. With LoRA only the adapters "
                           "train, and checkpoints hold the adapter in PEFT format.")
    lora_alpha: float = _f(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.")
    lora_dropout: float = _f(0.0, "Dropout on the input of the LoRA branch.")
    lora_targets: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"], "Linear layers that get adapters, by name (PEFT's "
                                           "target_modules).")
    load_in_4bit: bool = _f(False, "torch: QLoRA. Load the frozen base in 4-bit NF4 through "
                                   "transformers' BitsAndBytesConfig (needs bitsandbytes and "
                                   "lora_rank); compute in dtype. On mlx, quantize the base "
                                   "instead: gft convert SRC DST --quantize 4.")
    # ---- data
    data: str | None = _f(None, "JSONL file, mlx-lm style directory (train/valid/test.jsonl), or "
                                "local datasets files; unset = the embedded arithmetic task.")
    chat_template: bool | None = _f(None, "Wrap string prompts in the tokenizer's chat template "
                                          "(unset: only chat-message prompts use it).")
    max_prompt_tokens: int = _f(1024, "Longest prompt in tokens; see prompt_overflow.")
    prompt_overflow: str = _f("error", "What to do with a longer prompt: error | truncate "
                                       "(keep its last tokens) | skip (counted and reported).")
    max_response_tokens: int = _f(2048, "Longest response: rollouts stop here and dataset "
                                        "responses are truncated to it.")
    # ---- objective (presets set these four)
    preset: str = _f("gft", "sft | dft | grpo | gft: sets num_offpolicy, num_rollouts, advantage "
                            "and tau as in GFT.md's table; explicit values override it.")
    num_offpolicy: int = _f(4, "K: dataset responses per prompt that enter the group.")
    num_rollouts: int = _f(4, "n: on-policy rollouts sampled per prompt.")
    advantage: str = _f("grpo", "grpo (mean/std, N-1) | dr_grpo (mean only) | rloo | constant (A=1).")
    tau: float = _f(0.1, "DCR threshold: C(p) = 1 if p > tau else p. 0 = NLL, 1 = DFT.")
    loss_aggregation: str = _f("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum.")
    skip_zero_advantage: bool = _f(True, "Do not run forward/backward on responses with A = 0 "
                                         "(they add no gradient); they still count in the "
                                         "token-mean denominator, so the loss is unchanged.")
    rewards: list = _f(["math"], "Reward functions: math | exact | regex | module:function, or "
                                 "[{name, weight, ...options}]. The first one defines accuracy.")
    reward_timeout: float = _f(60.0, "Seconds one call of a reward function may take before "
                                     "the run stops with an error naming it and the row "
                                     "(0 = no limit).")
    # ---- sampling (rollouts)
    temperature: float = _f(1.0, "Rollout sampling temperature.")
    top_p: float = _f(1.0, "Rollout nucleus sampling threshold.")
    rollout_batch_size: int = _f(64, "Sequences decoded together in one generate call.")
    rollout_engine: str = _f("policy", "torch: policy (sample from the training weights) | "
                             "bfloat16 (from a bfloat16 copy refreshed after each update: "
                             "faster decoding, rollouts rounded to bfloat16).")
    rollout_graphs: str = _f("auto", "torch: auto | on | off. Decode through a step compiled "
                             "once per batch shape (torch.compile, static KV cache) and "
                             "replayed as a CUDA graph: a small model's decoding on a GPU is "
                             "kernel launches, which a graph replays at once. auto = on "
                             "CUDA; the first rollout of each shape compiles (tens of "
                             "seconds), and each shape's KV cache (rows x cache length, "
                             "rounded up to a power of two) stays allocated for the run: "
                             "set off when GPU memory is tight. A model the compiler "
                             "cannot take decodes eagerly, with a warning.")
    # ---- optimization
    learning_rate: float = _f(1e-6, "AdamW peak learning rate.")
    lr_schedule: str = _f("constant", "constant | linear | cosine (decay to 0 over max_steps).")
    warmup_steps: int = _f(0, "Linear warm-up optimizer updates.")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0 = no clipping).")
    prompts_per_step: int = _f(128, "Prompts sampled per training step (the paper: 128).")
    prompts_per_minibatch: int = _f(64, "Prompts per optimizer update; a step makes "
                                        "prompts_per_step / prompts_per_minibatch updates.")
    micro_batch_size: int = _f(8, "Sequences per forward/backward (gradient accumulation).")
    logits_chunk: int = _f(1024, "Positions whose [positions, vocabulary] logits the update "
                                 "holds at a time: the LM head, log-softmax and its backward run "
                                 "in chunks of this many positions (recomputed in the backward), "
                                 "so memory does not grow with tokens x vocabulary. 0 = all at "
                                 "once (llama/qwen2/qwen3/mistral heads; others always all).")
    epochs: float = _f(1.0, "Passes over the training data (used when max_steps is unset).")
    max_steps: int | None = _f(None, "Stop after this many steps (unset: epochs over the data).")
    max_policy_tokens: int = _f(0, "Stop once the run has processed this many policy tokens "
                                   "(rollout tokens generated + response tokens trained), "
                                   "at most one step past it: equal compute across presets "
                                   "(0 = no limit; steps/epochs still cap the run, and a "
                                   "linear/cosine decay runs over those). In a stage: that "
                                   "stage's own budget; see gft/budget.py.")
    stages: list | None = _f(None, "Chain presets in one run: [{sft: 200}, {gft: 300}, ...] or "
                                   "[{preset, steps, ...keys}]; see gft/stages.py.")
    # ---- run, logging, evaluation, checkpoints
    seed: int = _f(0, "Seed for data order, sampling and initialization of the default model.")
    output_dir: str | None = _f(None, "Run directory; unset = runs/<preset>-<timestamp>.")
    eval_every: int = _f(0, "Evaluate held-out accuracy every N steps (0 = only start and end).")
    eval_samples: int = _f(64, "Held-out prompts per evaluation (greedy decoding).")
    eval_split: str = _f("test", "Split used for held-out evaluation (test, then valid if absent).")
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Keep the last N step checkpoints (the final one is kept).")
    reset_optimizer: bool = _f(False, "On --resume: continue from a checkpoint whose "
                                      "optimizer.safetensors is missing or damaged, with fresh "
                                      "AdamW moments (the run then differs from an "
                                      "uninterrupted one). Applies to that resume only.")
    save_shard_size: str | int = _f("5GB", "Split saved weights into model-0000K-of-0000N."
                                           "safetensors shards above this size (e.g. 500MB, 2GB).")
    sample_every: int = _f(10, "Log a sample completion to samples.jsonl every N steps.")
    max_bad_steps: int = _f(5, "Stop after this many steps in a row with a non-finite loss "
                                "or gradient (each is skipped without an update).")
    progress: bool = _f(True, "Show a progress bar on the terminal.")


PRESETS: dict[str, dict[str, Any]] = {
    # K dataset responses, n rollouts, advantage estimator, DCR threshold (GFT.md's table).
    "sft": {"num_offpolicy": 1, "num_rollouts": 0, "advantage": "constant", "tau": 0.0},
    "dft": {"num_offpolicy": 1, "num_rollouts": 0, "advantage": "constant", "tau": 1.0},
    "grpo": {"num_offpolicy": 0, "num_rollouts": 8, "advantage": "grpo", "tau": 0.0},
    "gft": {"num_offpolicy": 4, "num_rollouts": 4, "advantage": "grpo", "tau": 0.1},
}

# The embedded default job: a tiny byte-level model trained from random init on the
# bundled arithmetic task, sized to finish in a few minutes on 2 CPU cores.
EMBEDDED_DEFAULT: dict[str, Any] = {
    # From random init the DCR coefficient (p < tau for every token) would damp GFT's
    # gradient to DFT's; a short SFT warm-up gives the partial skill the paper starts from.
    # GFT then runs at a lower learning rate: an RL stage at the SFT rate destabilizes.
    "stages": [{"sft": 300}, {"preset": "gft", "steps": 150, "learning_rate": 1e-3}],
    "learning_rate": 3e-3,
    "lr_schedule": "constant",
    "warmup_steps": 5,
    "weight_decay": 0.0,
    "prompts_per_step": 32,
    "prompts_per_minibatch": 32,
    "micro_batch_size": 64,
    "max_prompt_tokens": 128,
    "max_response_tokens": 24,
    "eval_every": 50,
    "eval_samples": 100,
    "save_every": 50,
    "rollout_batch_size": 128,
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
CHOICES = {
    "backend": ("auto", "torch", "mlx"),
    "parallel": ("ddp", "fsdp"),
    "rollout_engine": ("policy", "bfloat16"),
    "rollout_graphs": ("auto", "on", "off"),
    "dtype": ("float32", "bfloat16"),
    "prompt_overflow": ("error", "truncate", "skip"),
    "preset": tuple(PRESETS),
    "advantage": tuple(ADVANTAGE_ESTIMATORS),
    "loss_aggregation": tuple(AGGREGATIONS),
    "lr_schedule": ("constant", "linear", "cosine"),
}


def field_help(name: str) -> str:
    return FIELDS[name].metadata.get("help", "")


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a value against the field's annotated type; ints are accepted for floats."""
    hint = typing.get_type_hints(TrainConfig)[name]
    args = typing.get_args(hint) or (hint,)
    if value is None and type(None) in args:
        return None
    for t in args:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (str, bool, list) and isinstance(value, t):
            return value
        if t is str and isinstance(value, bool) and "on" in CHOICES.get(name, ()):
            return "on" if value else "off"  # YAML 1.1 reads on / off / yes / no as booleans
    if list in args and isinstance(value, (str, dict)):  # rewards: "math" or {name: weight}
        return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in args)
    raise ConfigError(f"{where}: '{name}' must be {names}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject values that cannot work, with the field named."""
    for name, value in dataclasses.asdict(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"'{name}' must be a finite number, got {value}")
    for name, options in CHOICES.items():
        if getattr(cfg, name) not in options:
            val = getattr(cfg, name)
            raise ConfigError(f"'{name}' must be one of {', '.join(options)}, got {val!r}"
                              + _suggest(str(val), options))
    if not 0.0 <= cfg.tau <= 1.0:
        raise ConfigError(f"'tau' must be in [0, 1], got {cfg.tau}")
    if cfg.num_offpolicy < 0 or cfg.num_rollouts < 0:
        raise ConfigError("'num_offpolicy' and 'num_rollouts' must be >= 0")
    if cfg.num_offpolicy + cfg.num_rollouts == 0:
        raise ConfigError("a group needs at least one response: num_offpolicy + num_rollouts = 0")
    if cfg.advantage != "constant" and cfg.num_offpolicy + cfg.num_rollouts < 2:
        raise ConfigError(f"advantage '{cfg.advantage}' compares responses within a group; a group "
                          "of one has no baseline (use num_offpolicy + num_rollouts >= 2)")
    for name in ("prompts_per_step", "prompts_per_minibatch", "micro_batch_size",
                 "max_prompt_tokens", "max_response_tokens", "eval_samples", "keep_checkpoints",
                 "rollout_batch_size", "max_bad_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.logits_chunk < 0:
        raise ConfigError(f"'logits_chunk' must be >= 0 (0 = off), got {cfg.logits_chunk}")
    if cfg.prompts_per_step % cfg.prompts_per_minibatch:
        raise ConfigError(f"'prompts_per_step' ({cfg.prompts_per_step}) must be a multiple of "
                          f"'prompts_per_minibatch' ({cfg.prompts_per_minibatch})")
    if cfg.learning_rate <= 0 or cfg.temperature <= 0 or not 0 < cfg.top_p <= 1:
        raise ConfigError("'learning_rate' and 'temperature' must be > 0 and 'top_p' in (0, 1]")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"'max_steps' must be >= 1, got {cfg.max_steps}")
    _check_ranges(cfg)
    if cfg.max_policy_tokens < 0:
        raise ConfigError(f"'max_policy_tokens' must be >= 0 (0 = no limit), got "
                          f"{cfg.max_policy_tokens}")
    from gft.convert import parse_size  # LoRA keys and the shard size
    from gft.lora import lora_from_train_config
    lora_from_train_config(cfg)
    if parse_size(cfg.save_shard_size) < 1:
        raise ConfigError(f"'save_shard_size' must be positive, got {cfg.save_shard_size!r}")
    return cfg


# Ranges of the keys `validate` does not check on its own: (test, what it says).
_AT_LEAST_0 = ("warmup_steps", "eval_every", "save_every", "sample_every", "lora_rank",
               "weight_decay", "max_grad_norm", "reward_timeout")
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "adam_beta1": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "adam_beta2": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "adam_eps": (lambda v: v > 0, "> 0"),
    "epochs": (lambda v: v > 0, "> 0"),
    "lora_alpha": (lambda v: v > 0, "> 0"),
    "lora_dropout": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**63, "in 0 .. 2**63-1"),
    **{name: (lambda v: v >= 0, ">= 0") for name in _AT_LEAST_0},
}
# torch device names (torch.device's syntax); mlx also takes gpu. Availability is the
# backend's to check (backends/*.check_device), before it loads anything.
_DEVICE = re.compile(r"auto|cpu|gpu|mps|metal|cuda(:\d+)?|xpu(:\d+)?")


def _check_ranges(cfg: TrainConfig) -> None:
    for name, (ok, text) in _RANGES.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise ConfigError(f"'{name}' must be {text}, got {value!r}")
    if not _DEVICE.fullmatch(cfg.device):
        raise ConfigError(f"'device' must be auto, cpu, cuda, cuda:N, mps or gpu, got "
                          f"{cfg.device!r}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); "
                          "save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of key: value")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} is not a name; config keys are names "
                              "like learning_rate (see gft train --help-config)")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 *, source: str = "config") -> TrainConfig:
    """Layer defaults < preset < embedded default < YAML < overrides, then validate."""
    yaml_values, overrides = dict(yaml_values or {}), dict(overrides or {})
    merged: dict[str, Any] = {}
    for where, layer in ((source, yaml_values), ("command line", overrides)):
        for key, value in layer.items():
            if key not in FIELDS:
                raise ConfigError(f"{where}: unknown key '{key}'" + _suggest(key, FIELDS))
            merged[key] = _coerce(key, value, where)
    preset = merged.get("preset", "gft")
    if preset not in PRESETS:
        raise ConfigError(f"'preset' must be one of {', '.join(PRESETS)}, got {preset!r}"
                          + _suggest(str(preset), PRESETS))
    values: dict[str, Any] = dict(PRESETS[preset])
    if merged.get("model") is None and merged.get("data") is None:
        values.update(EMBEDDED_DEFAULT)
        if "preset" in merged:  # an explicit preset means a single-stage run of it
            values["stages"] = None
    values.update(merged)
    cfg = validate(TrainConfig(**values))
    from gft.stages import plan_stages  # late: stages builds on this module
    plan_stages(cfg, 1)  # reject a bad stage now, not hours into the run
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
