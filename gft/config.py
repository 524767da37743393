"""Training configuration: one flat dataclass, every field with help.

Values are layered, later layers winning:
  1. the dataclass defaults (the paper's Qwen2.5-Math-1.5B settings, docs/ALGORITHM.md),
  2. the preset (`sft`, `dft`, `grpo`, `gft`: K, n, advantage estimator, tau),
  3. the embedded default job's settings, only when neither `model` nor `data` is given,
  4. the YAML file,
  5. command-line overrides.
Unknown keys and bad values raise ConfigError with a did-you-mean suggestion. Each entry of
`stages` is checked here as well (read_stages); gft/stages.py plans the run from them.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Callable


from gft.errors import ConfigError
from gft.foreignkeys import FOREIGN_KEYS
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
    disable_dropout: bool = _f(True, "torch: switch the model's own dropout off in the update "
                                     "(as TRL's disable_dropout), so that it scores the "
                                     "network that sampled the rollouts. false keeps the "
                                     "rates in the model's config (GPT-2, OPT: 0.1). mlx-lm's "
                                     "models have no dropout. LoRA's is lora_dropout.")
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
                                           "target_modules); each must name one or more.")
    load_in_4bit: bool = _f(False, "torch: QLoRA. Load the frozen base in 4-bit NF4 through "
                                   "transformers' BitsAndBytesConfig (needs bitsandbytes and "
                                   "lora_rank); compute in dtype. On mlx, quantize the base "
                                   "instead: gft convert SRC DST --quantize 4.")
    # ---- data
    data: str | None = _f(None, "JSONL file, mlx-lm style directory (train/valid/test.jsonl), "
                                "local datasets files, or a Hugging Face Hub id (org/name, "
                                "org/name:config); unset = the embedded arithmetic task.")
    answer_column: str = _f("answer", "The data column holding the ground truth that the "
                                      "built-in rewards compare with (e.g. TRL's \"solution\"); "
                                      "it is also passed to reward functions under its own name. "
                                      "A dotted name reads a field inside an object column "
                                      "(verl's reward_model.ground_truth).")
    prompt_column: str = _f("prompt", "The data column holding the prompt (a string or chat "
                                      "messages) when a data set names it otherwise, e.g. "
                                      "problem (MATH, NuminaMath) or question (GSM8K).")
    completion_column: str = _f("completion", "The data column holding the dataset "
                                              "response(s) when a data set names it otherwise, "
                                              "e.g. solution.")
    system_prompt: str | None = _f(None, "A system message put first in every prompt that has "
                                         "none (a string prompt becomes a system + user chat, "
                                         "rendered with the chat template), as Open-R1's "
                                         "system_prompt; gft generate and eval on the trained "
                                         "model put it there too.")
    chat_template: bool | None = _f(None, "Wrap string prompts in the tokenizer's chat template "
                                          "(unset: only chat-message prompts use it).")
    max_prompt_tokens: int = _f(1024, "Longest prompt in tokens; see prompt_overflow.")
    prompt_overflow: str = _f("error", "What to do with a longer prompt: error | truncate "
                                       "(keep its last tokens) | skip (counted and reported).")
    max_response_tokens: int = _f(2048, "Longest response: rollouts stop here and dataset "
                                        "responses are truncated to it.")
    stop: list = _f([], "More token ids or strings that end rollouts and evaluation, besides "
                        "the tokenizer's EOS and every eos_token_id in the model's "
                        "generation_config.json (which always do), e.g. ['<|im_end|>', "
                        "'\\n\\nQuestion:'].")
    # ---- objective (presets set these four)
    preset: str = _f("gft", "sft | dft | grpo | gft: sets num_offpolicy, num_rollouts, advantage "
                            "and tau as in docs/ALGORITHM.md's table; explicit values "
                            "override it.")
    num_offpolicy: int = _f(4, "K: dataset responses per prompt that enter the group.")
    num_rollouts: int = _f(4, "n: on-policy rollouts sampled per prompt.")
    advantage: str = _f("grpo", "grpo (mean/std, N-1) | dr_grpo (mean only) | rloo | constant (A=1).")
    tau: float = _f(0.1, "DCR threshold: C(p) = 1 if p > tau else p. 0 = NLL, 1 = DFT.")
    loss_aggregation: str = _f("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum.")
    skip_zero_advantage: bool = _f(True, "Do not run forward/backward on responses with A = 0 "
                                         "(they add no gradient); they still count in the "
                                         "token-mean denominator, so the loss is unchanged.")
    rewards: list | None = _f(None, "Reward functions: math | exact | regex | module:function | "
                                    "file.py:function (TRL's calling convention), or "
                                    "[{name, weight, ...options}]. The first one defines "
                                    "accuracy. Unset: math when a stage samples rollouts "
                                    "or compares responses (grpo, gft); none for sft/dft, "
                                    "which then report no reward.")
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
    micro_batch_tokens: int = _f(0, "Also cap each micro-batch at this many padded tokens (rows "
                                    "x longest row): sequences sorted by length are packed "
                                    "greedily, so short demonstrations are not padded to long "
                                    "rollouts. Same loss. 0 = off (micro_batch_size only).")
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
    eval_samples: int = _f(64, "Held-out prompts per evaluation (greedy decoding); 0 = no "
                               "evaluation.")
    eval_data: str | None = _f(None, "Held-out data: a file, a directory or a Hub data set "
                                     "org/name (its eval_split, else valid), or a split "
                                     "name of `data`. Unset: "
                                     "eval_split of a `data` directory; a single data file "
                                     "has none (see eval_holdout).")
    eval_split: str = _f("test", "Split of a data directory used for held-out evaluation "
                                 "(test, then valid if absent; another name must exist).")
    eval_holdout: float = _f(0.0, "When there is no held-out data: set aside this fraction "
                                  "of the training rows (seeded; never trained on) for "
                                  "evaluation. 0 = evaluate nothing rather than training rows.")
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(2, "Keep the last N step checkpoints, at least the last step's "
                               "(a finished run resumes from it: final/ holds the model only).")
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
    logging_steps: int = _f(10, "When stdout is not a terminal (a cluster job, nohup, a "
                                "pipe): print one plain line of metrics every N steps.")
    report_to: list = _f([], "Experiment trackers: any of tensorboard, wandb, trackio, "
                             "mlflow (each through its own client; pip install "
                             "'gft[wandb]' etc.). They get metrics.jsonl's numbers and "
                             "samples.jsonl's completions as tables. [] or none: no tracker.")
    run_name: str = _f("", "The run's name in the experiment trackers (TRL's run_name); "
                           "empty: the run directory's name.")


PRESETS: dict[str, dict[str, Any]] = {
    # K dataset responses, n rollouts, advantage estimator, DCR threshold (docs/ALGORITHM.md).
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
    "rewards": ["math"],  # the task's answers are numbers; also scored during the SFT stage
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


def config_help() -> str:
    """Every key with its default and help (`gft train --help-config`). The defaults are
    the dataclass's; a preset, the embedded default job, YAML and --set override them."""
    defaults = TrainConfig()
    lines = []
    for name in FIELDS:
        value = getattr(defaults, name)
        shown = "unset" if value is None else json.dumps(value) \
            if isinstance(value, (list, dict)) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        lines.append(f"  {name} (default: {shown})")
        lines += textwrap.wrap(field_help(name), 88, initial_indent=" " * 6,
                               subsequent_indent=" " * 6)
    return "\n".join(lines)


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_key(key: str, where: str) -> str:
    """The message for a key gft does not have: TRL's or mlx-lm's name for a gft key
    points at it; anything else gets a did-you-mean."""
    if key in FOREIGN_KEYS:
        return f"{where}: unknown key '{key}': {FOREIGN_KEYS[key]}"
    return f"{where}: unknown key '{key}'" + _suggest(key, FIELDS)


def _check_known(layer: dict[str, Any], where: str, lines: dict[str, int]) -> None:
    """Every key gft does not have, in one error: a TRL or mlx-lm config brought over
    holds dozens, and naming one per attempt made a user run gft once per key."""
    unknown = [key for key in layer if key not in FIELDS]
    if len(unknown) == 1:
        line = f":{lines[unknown[0]]}" if unknown[0] in lines else ""
        raise ConfigError(unknown_key(unknown[0], where + line))
    if unknown:
        raise ConfigError(
            f"{where}: {len(unknown)} unknown keys (gft train --help-config lists gft's):\n"
            + "\n".join("  " + unknown_key(key, f"line {lines[key]}" if key in lines
                                           else "").lstrip(": ") for key in unknown))


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
        if t is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # `max_steps: 1e4`, as TRL and mlx-lm configs write counts
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
    from gft.tracking import tracker_names
    tracker_names(cfg.report_to)
    for name in ("prompts_per_step", "prompts_per_minibatch", "micro_batch_size",
                 "max_prompt_tokens", "max_response_tokens", "keep_checkpoints",
                 "rollout_batch_size", "max_bad_steps", "logging_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"'{name}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("logits_chunk", "micro_batch_tokens"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"'{name}' must be >= 0 (0 = off), got {getattr(cfg, name)}")
    if cfg.eval_samples < 0:
        raise ConfigError(f"'eval_samples' must be >= 0 (0 = no evaluation), "
                          f"got {cfg.eval_samples}")
    if not 0.0 <= cfg.eval_holdout < 1.0:
        raise ConfigError(f"'eval_holdout' must be a fraction in [0, 1), got {cfg.eval_holdout}")
    for name in ("answer_column", "prompt_column", "completion_column"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"'{name}' must name a column")
    if cfg.system_prompt is not None and not cfg.system_prompt.strip():
        raise ConfigError("'system_prompt' must be text (leave it out for none)")
    if not cfg.eval_split.strip():
        raise ConfigError("'eval_split' must name a split")
    for name in PATH_KEYS:
        value = getattr(cfg, name)
        if isinstance(value, str) and not value.strip():
            # Path("") is the working directory: `data: ""` trained on ./train.jsonl
            raise ConfigError(f"'{name}' is an empty string; give a path, or null (or no "
                              "key) to leave it unset")
    if cfg.prompts_per_step % cfg.prompts_per_minibatch:
        raise ConfigError(f"'prompts_per_step' ({cfg.prompts_per_step}) must be a multiple of "
                          f"'prompts_per_minibatch' ({cfg.prompts_per_minibatch})")
    for name, ok, text in (("learning_rate", cfg.learning_rate > 0, "> 0"),
                           ("temperature", cfg.temperature > 0, "> 0 (rollouts sample)"),
                           ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]")):
        if not ok:  # name the one key that is wrong, with its value
            raise ConfigError(f"'{name}' must be {text}, got {getattr(cfg, name)!r}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"'max_steps' must be >= 1, got {cfg.max_steps}"
                          + ("; TRL's -1 (no limit: epochs decide) is gft's default, so "
                             "leave max_steps out" if cfg.max_steps == -1 else ""))
    _check_ranges(cfg)
    if cfg.max_policy_tokens < 0:
        raise ConfigError(f"'max_policy_tokens' must be >= 0 (0 = no limit), got "
                          f"{cfg.max_policy_tokens}")
    from gft.weights import parse_size  # LoRA keys and the shard size
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


# ------------------------------------------------------------------ stage entries
# What each entry of `stages` may say is part of the config's schema, so it is checked
# here, when the config is built (a bad stage is rejected before the run starts, not hours
# into it); gft/stages.py builds the plan (step ranges) from read_stages and imports this
# module, never the other way round.

# Keys a stage may not change: they define the model, the data or the run itself.
RUN_KEYS = {"model", "backend", "device", "dtype", "data", "output_dir", "seed", "stages",
            "trust_remote_code", "max_steps", "epochs", "lora_rank", "lora_alpha",
            "lora_dropout", "lora_targets", "save_shard_size", "gradient_checkpointing",
            "disable_dropout", "parallel", "rollout_engine", "mixed_precision", "logits_chunk",
            # read once for the whole run (gft/run.py, the loop's own cfg), never from a
            # stage: a stage setting them was accepted and silently ignored (a stage's
            # rewards scored nothing; the run's, or math, did)
            "rewards", "reward_timeout", "answer_column", "prompt_column",
            "completion_column", "system_prompt", "chat_template", "max_prompt_tokens",
            "prompt_overflow", "stop", "eval_data", "eval_split", "eval_holdout",
            "eval_samples", "eval_every", "save_every", "keep_checkpoints", "sample_every",
            "logging_steps", "progress", "report_to", "run_name", "reset_optimizer",
            "check_memory", "max_bad_steps", "load_in_4bit", "rollout_graphs", "weight_decay",
            "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm"}


def _normalize_stage(item: Any, i: int) -> dict[str, Any]:
    """`sft: 200`, `"sft:200"` or `{preset: sft, steps: 200, ...}` -> a dict."""
    if isinstance(item, str) and ":" in item:
        name, steps = item.split(":", 1)
        try:
            return {"preset": name.strip(), "steps": int(steps)}
        except ValueError:
            raise ConfigError(f"stages[{i}]: '{item}' must look like preset:steps") from None
    if isinstance(item, dict) and len(item) == 1 and next(iter(item)) in PRESETS:
        (name, steps), = item.items()
        return {"preset": name, "steps": steps}
    if isinstance(item, dict) and "preset" in item:
        return dict(item)
    presets = [key for key in item if key in PRESETS] if isinstance(item, dict) else []
    if len(presets) == 1:  # `- sft: 200` with `learning_rate: ...` under it, in YAML
        name, keys = presets[0], [k for k in item if k != presets[0]]
        raise ConfigError(f"stages[{i}]: '{name}: {item[name]}' with other keys "
                          f"({', '.join(map(str, keys))}); write it as {{preset: {name}, "
                          f"steps: {item[name]}, {keys[0]}: ...}}")
    if isinstance(item, dict) and len(item) == 1 and next(iter(item)) not in FIELDS:
        name = str(next(iter(item)))
        raise ConfigError(f"stages[{i}]: unknown preset '{name}'" + _suggest(name, PRESETS))
    raise ConfigError(f"stages[{i}]: expected 'preset: steps' or a mapping with 'preset' and "
                      f"'steps', got {item!r}")


def stage_config(base: TrainConfig, values: dict[str, Any], i: int) -> tuple[TrainConfig, int]:
    """The base config with the stage's preset, then its own keys; and its step count."""
    preset = values.pop("preset")
    if preset not in PRESETS:
        raise ConfigError(f"stages[{i}]: unknown preset {preset!r}" + _suggest(str(preset), PRESETS))
    steps = values.pop("steps", None)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"stages[{i}]: 'steps' must be a positive integer, got {steps!r}")
    for key in values:
        if key not in FIELDS:
            raise ConfigError(unknown_key(key, f"stages[{i}]"))
        if key in RUN_KEYS:
            raise ConfigError(f"stages[{i}]: '{key}' is set for the whole run, not per stage")
    own = {k: _coerce(k, v, f"stages[{i}]") for k, v in values.items()}
    cfg = replace(base, preset=preset, stages=None, **{**PRESETS[preset], **own})
    return validate(cfg), steps


def read_stages(cfg: TrainConfig) -> list[tuple[TrainConfig, int, int]]:
    """Each entry of cfg.stages, checked: (its config, its steps, its own policy-token
    budget or 0); [] for a run without stages."""
    if not cfg.stages:
        return []
    if not isinstance(cfg.stages, list):
        raise ConfigError("'stages' must be a list of 'preset: steps' entries")
    out = []
    for i, item in enumerate(cfg.stages):
        values = _normalize_stage(item, i)
        stage_cfg, steps = stage_config(cfg, values, i)
        tokens = stage_cfg.max_policy_tokens if "max_policy_tokens" in values else 0
        out.append((stage_cfg, steps, tokens))
    return out


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 *, source: str = "config") -> TrainConfig:
    """Layer defaults < preset < embedded default < YAML < overrides, then validate."""
    lines = getattr(yaml_values, "lines", {})  # read_yaml's: the line of each key
    yaml_values, overrides = dict(yaml_values or {}), dict(overrides or {})
    merged: dict[str, Any] = {}
    for where, layer in ((source, yaml_values), ("command line", overrides)):
        _check_known(layer, where, lines if layer is yaml_values else {})
        for key, value in layer.items():
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
    values.update(_home_expanded(values))
    cfg = validate(TrainConfig(**values))
    read_stages(cfg)  # reject a bad stage now, not hours into the run
    return cfg


# Keys that name local files or directories (a hub id or a split name is left as given).
PATH_KEYS = ("model", "data", "eval_data", "output_dir")


def _home_expanded(values: dict[str, Any]) -> dict[str, Any]:
    """'~/models/m' as the shell would expand it: a YAML file or --set KEY=~/... reaches
    us unexpanded, and a literal '~' would name a directory in the working directory."""
    return {k: os.path.expanduser(values[k]) for k in PATH_KEYS
            if isinstance(values.get(k), str) and values[k].startswith("~")}


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
