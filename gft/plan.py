"""A memory plan before training: expected peak memory of a run, from the model's
config.json and the TrainConfig alone (no weights read, no backend imported).

    peak = weights + trainable state + max(update, rollouts)
    weights          every parameter in `dtype`; a quantized base: packed bits + one scale
                     and one bias per group (mlx-lm), or NF4 + absmax (bitsandbytes)
    trainable state  LoRA adapters (float32) or nothing extra (full: the weights train),
                     their gradients, and AdamW's two moments
    update           activations one micro-batch keeps for its backward pass, plus the
                     logits / softmax over the vocabulary of its response tokens
    rollouts         the KV cache of one rollout batch, one layer's tensors while its
                     distinct prompts are prefilled (both backends prefill a prompt once
                     and copy its cache rows to its G rollouts), and its last-position
                     logits
Rollouts and the update never run at the same time, so only the larger counts.

Shapes: B micro_batch_size, L = max_prompt_tokens + max_response_tokens (the longest
sequence the config allows: the plan is for the worst batch), R = max_response_tokens + 1
scored positions, h hidden, I intermediate, H/KV heads, d head_dim, V vocabulary, N layers.

Deliberate simplifications (each an estimate, checked against measured peaks in
benchmarks/plan_check.py):
- decoder-only Llama/Qwen2/Qwen3-style layers (attention q/k/v/o + SwiGLU MLP); other
  architectures are planned as if they were such layers of the config's sizes;
- saved activations per token per layer: 6h + 3·H·d + 3·KV·d + 4I values, plus the
  attention probabilities (H·L per token) that a non-fused attention backward keeps;
  the tokens are B·L, or P + B·R when every micro-batch's rows share one prompt that the
  backend runs once (shares_prompt: one prompt per optimizer update);
  under gradient checkpointing, one h per layer plus one layer's worth;
- the update's vocabulary tensors: three float32 [logits_chunk, V] arrays (logits,
  softmax, their gradient) when the backend computes them in chunks, four [B·R, V] when
  it cannot (MLX over a quantized head: vocab_arrays, head_chunks);
- MLX's KV cache (mlx-lm's BatchKVCache) grows in blocks of 256 positions, so it holds
  L rounded up to a multiple of 256; torch's grows by the token;
- allocator slack, the framework's own workspace and Python are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gft.errors import ConfigError

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BITS = 4.127  # bitsandbytes NF4 with double quantization: 4 bits + absmax per 64


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only model, from config.json."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear inside one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, \
            self.intermediate
        return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv),
                "self_attn.v_proj": (h, kv), "self_attn.o_proj": (q, h),
                "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}


def _standard_names(c: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers' standard size names added where the architecture's
    config class renames them (GPT-2's n_embd is hidden_size, ...: its attribute_map)."""
    try:
        from transformers import CONFIG_MAPPING
        amap = getattr(CONFIG_MAPPING[c.get("model_type")], "attribute_map", {})
    except (KeyError, ImportError):
        return c
    return {**{std: c[own] for std, own in amap.items() if own in c}, **c}


def shape_of(config: dict[str, Any]) -> Shape:
    """Shape from a config.json (a multimodal config's text_config when present)."""
    c = _standard_names(config.get("text_config") or config)
    try:
        hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        return Shape(layers=int(c["num_hidden_layers"]), hidden=hidden,
                     intermediate=int(c["intermediate_size"]), heads=heads,
                     kv_heads=int(c.get("num_key_value_heads") or heads),
                     head_dim=int(c.get("head_dim") or hidden // heads),
                     vocab=int(c["vocab_size"]),
                     tied=bool(c.get("tie_word_embeddings", False)),
                     qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias")))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config.json: cannot plan memory without '{e}' "
                          "(hidden_size, num_hidden_layers, ...)") from None


@dataclass(frozen=True)
class Item:
    """One line of the plan: bytes, and the config key that makes it smaller."""
    name: str
    nbytes: float
    shrink: str


@dataclass(frozen=True)
class MemoryPlan:
    resident: tuple[Item, ...]   # held for the whole run
    update: tuple[Item, ...]     # during forward/backward
    rollout: tuple[Item, ...]    # during generation
    available: float | None      # bytes the device can give (None: unknown)
    device: str

    @property
    def peak(self) -> float:
        return sum(i.nbytes for i in self.resident) + max(
            sum(i.nbytes for i in self.update), sum(i.nbytes for i in self.rollout))

    @property
    def items(self) -> tuple[Item, ...]:
        return self.resident + self.update + self.rollout

    def largest(self) -> Item:
        return max(self.items, key=lambda i: i.nbytes)

    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available


# ------------------------------------------------------------------ weights

def _bits(q: dict[str, Any] | None, path: str) -> float | None:
    """Bits per weight of a layer under an mlx-lm quantization dict (None: float)."""
    if q is None:
        return None
    entry = q.get(path, q)
    if entry is False:
        return None
    return float(entry.get("bits", q["bits"])) if isinstance(entry, dict) else float(q["bits"])


def _linear_bytes(n_in: int, n_out: int, bits: float | None, group: int, elem: int) -> float:
    if bits is None or (bits != NF4_BITS and n_in % group):  # mlx-lm leaves those in float
        return n_in * n_out * elem
    return n_in * n_out * bits / 8 + 2 * n_out * (n_in / group) * elem  # scales + biases


def weight_bytes(s: Shape, elem: int, mlx_q: dict[str, Any] | None = None,
                 nf4: bool = False) -> float:
    """Every parameter: embeddings, the decoder layers' linears and norms, the head."""
    group = int((mlx_q or {}).get("group_size", 64))
    total = 0.0
    for n in range(s.layers):
        for rel, (i, o) in s.linears().items():
            bits = NF4_BITS if nf4 else _bits(mlx_q, f"model.layers.{n}.{rel}")
            total += _linear_bytes(i, o, bits, group, elem)
        total += 2 * s.hidden * elem  # two RMSNorms
        if s.qkv_bias:
            total += (s.heads + 2 * s.kv_heads) * s.head_dim * elem
    # embeddings (mlx-lm quantizes them too; bitsandbytes leaves them and the head in float)
    total += _linear_bytes(s.hidden, s.vocab, None if nf4 else _bits(mlx_q, "model.embed_tokens"),
                           group, elem)
    if not s.tied:
        total += _linear_bytes(s.hidden, s.vocab, None if nf4 else _bits(mlx_q, "lm_head"),
                               group, elem)
    return total + s.hidden * elem  # final norm


def param_count(s: Shape) -> int:
    return int(weight_bytes(s, 1))


def lora_params(s: Shape, rank: int, targets: list[str]) -> int:
    """r·(in + out) per targeted linear in every layer (PEFT's suffix match on names)."""
    per_layer = sum(rank * (i + o) for rel, (i, o) in s.linears().items()
                    if any(rel == t or rel.endswith("." + t) for t in targets))
    return per_layer * s.layers


# ------------------------------------------------------------------ activations

def activation_bytes(s: Shape, rows: int, length: int, elem: int, checkpointing: bool,
                     attention_probs: bool = True, tokens: int | None = None) -> float:
    """What one micro-batch's forward keeps for its backward pass. attention_probs: the
    attention's backward keeps its [H, L, L] probabilities (MLX's scaled_dot_product_attention
    gradient); torch's fused kernels (flash / memory-efficient, CPU flash) keep only
    a log-sum-exp per row. tokens: positions the forward runs (default rows x length;
    fewer when the rows' shared prompt runs once, update_tokens)."""
    per_token = (6 * s.hidden + 3 * s.heads * s.head_dim + 3 * s.kv_heads * s.head_dim
                 + 4 * s.intermediate + (s.heads * length if attention_probs else 0))
    tokens = rows * length if tokens is None else tokens
    if checkpointing:
        return tokens * (s.layers * s.hidden + per_token) * elem
    return tokens * s.layers * per_token * elem


def shares_prompt(cfg, backend: str, device: str) -> bool:
    """Whether every micro-batch's rows run their common prompt once. Both backends run
    the prefix the rows of a micro-batch share once (MLX always, for llama-style heads;
    torch on the CPU only: TorchBackend._share_prefix). Micro-batches are cut from an
    optimizer update's rows sorted by length (gft.groups.micro_batches), so they hold one
    prompt's group only when the update holds one prompt (prompts_per_minibatch: 1);
    with more, a micro-batch may mix prompts and the plan takes that worst case."""
    if cfg.prompts_per_minibatch != 1:
        return False
    return backend == "mlx" or (backend == "torch" and "cpu" in device)


def update_tokens(cfg, backend: str, device: str) -> int:
    """Positions one micro-batch's forward runs: B x L, or the prompt once plus B
    responses when the rows share it (shares_prompt)."""
    rows, prompt, response = cfg.micro_batch_size, cfg.max_prompt_tokens, cfg.max_response_tokens
    if shares_prompt(cfg, backend, device):
        return prompt + rows * response
    return rows * (prompt + response)


def prefill_bytes(s: Shape, rows: int, prompt: int, elem: int) -> float:
    """One layer's intermediate tensors while the prompts run through it (nothing is kept
    for a backward pass: one layer's worth is alive at a time)."""
    return rows * prompt * (4 * s.hidden + 2 * s.heads * s.head_dim + 3 * s.intermediate) * elem


MLX_KV_STEP = 256  # mlx-lm's KVCache / BatchKVCache.step: positions allocated at a time


def kv_positions(length: int, backend: str) -> int:
    """Positions the KV cache of a `length`-token sequence holds: mlx-lm allocates its
    cache MLX_KV_STEP positions at a time (a 77-token rollout holds 256); torch's
    DynamicCache concatenates one token at a time."""
    if backend == "mlx":
        return -(-length // MLX_KV_STEP) * MLX_KV_STEP
    return length


def kv_cache_bytes(s: Shape, rows: int, length: int, elem: int) -> float:
    return rows * length * s.layers * 2 * s.kv_heads * s.head_dim * elem


# ------------------------------------------------------------------ the plan

def head_chunks(s: Shape, backend: str, mlx_q: dict[str, Any] | None) -> bool:
    """Whether the update computes the head's logits in logits_chunk pieces. Both backends
    chunk a plain float head (torch's QLoRA keeps lm_head and the embeddings in float);
    MLX cannot chunk a quantized one (backends/mlx_head.head_weight: mlx-lm's quantized
    embedding or lm_head), so there the whole micro-batch's logits are made at once."""
    if backend != "mlx":
        return True
    return _bits(mlx_q, "model.embed_tokens" if s.tied else "lm_head") is None


def logit_positions(cfg, backend: str, chunked: bool = True) -> int:
    """Scored positions whose [., V] logits the update holds at once: a micro-batch's
    responses (R per row), or at most logits_chunk of them (both backends chunk
    llama/qwen2/qwen3-style float heads: head_chunks)."""
    positions = cfg.micro_batch_size * (cfg.max_response_tokens + 1)
    chunk = getattr(cfg, "logits_chunk", 0) if chunked else 0
    return min(positions, chunk) if chunk else positions


def vocab_arrays(chunked: bool) -> int:
    """float32 [positions, V] arrays alive at the update's peak. Chunked (head_logprobs):
    a chunk's logits, its softmax and their gradient, 3 (MLX measured 2.8 on a 1,032 x
    8,192 case). Unchunked (MLX over a quantized head: target_logprobs + token_entropy on
    the whole logits): the logits, their log-sum-exp'd probabilities for the entropy,
    the log-softmax for the targets and the gradient, 4 (measured 4.0 on the same case)."""
    return 3 if chunked else 4


def rollout_rows(cfg) -> int:
    """Sequences decoded together: a step's rollouts, or a held-out evaluation's prompts."""
    wanted = max(cfg.prompts_per_step * cfg.num_rollouts, cfg.eval_samples)
    return min(cfg.rollout_batch_size, wanted)


def prefill_rows(cfg, static_cache: bool = False) -> int:
    """Distinct prompts prefilled together. Both backends prefill each distinct prompt of a
    generate call once and copy its KV rows to the rows that repeat it (gft.groups.
    shared_prompts), so a batch of a step's rollouts prefills rollout_batch_size /
    num_rollouts prompts (one more when a group straddles two batches); a held-out
    evaluation (eval_samples > 0) decodes one row per prompt. static_cache: torch's
    compiled decode (rollout_graphs on CUDA) has one cache slot per row and prefills
    every row."""
    rows = min(cfg.rollout_batch_size, cfg.prompts_per_step * cfg.num_rollouts)
    if static_cache:
        return rollout_rows(cfg)
    n = max(cfg.num_rollouts, 1)
    train = min(cfg.prompts_per_step, -(-rows // n) + (1 if rows % n else 0)) if rows else 0
    return max(train, min(cfg.rollout_batch_size, cfg.eval_samples))


def plan(config: dict[str, Any], cfg, *, backend: str = "torch", available: float | None = None,
         device: str = "unknown") -> MemoryPlan:
    """The memory plan of TrainConfig `cfg` for the model whose config.json is `config`,
    on `backend` ("torch" or "mlx": only their attention backward differs here).
    cfg.load_in_4bit (torch QLoRA) and an mlx-lm "quantization" entry plan packed weights."""
    from gft.quant import mlx_quantization
    s = shape_of(config)
    elem = _DTYPE_BYTES.get(cfg.dtype, 4)
    mlx_q = mlx_quantization(config)
    weights = weight_bytes(s, elem, mlx_q, nf4=getattr(cfg, "load_in_4bit", False))
    if cfg.lora_rank:
        targets = [cfg.lora_targets] if isinstance(cfg.lora_targets, str) else list(cfg.lora_targets)
        n_train, t_elem = lora_params(s, cfg.lora_rank, targets), 4  # adapters stay float32
        resident = [Item("weights (frozen base)", weights, "a quantized base (gft convert "
                         "--quantize 4) or dtype: bfloat16"),
                     Item("LoRA adapters", n_train * t_elem, "lora_rank")]
    else:
        n_train, t_elem = param_count(s), elem
        resident = [Item("weights (trained)", weights, "lora_rank (train adapters only)")]
    resident += [Item("gradients", n_train * t_elem, "lora_rank"),
                 Item("AdamW moments", 2 * n_train * t_elem, "lora_rank")]
    length = cfg.max_prompt_tokens + cfg.max_response_tokens
    rows = cfg.micro_batch_size
    chunked = head_chunks(s, backend, mlx_q)
    update = [Item("activations of one micro-batch",
                   activation_bytes(s, rows, length, elem, cfg.gradient_checkpointing,
                                    attention_probs=backend == "mlx",
                                    tokens=update_tokens(cfg, backend, device)),
                   "micro_batch_size (or gradient_checkpointing: true)"),
              Item("update logits/softmax",
                   vocab_arrays(chunked) * logit_positions(cfg, backend, chunked) * s.vocab * 4,
                   "logits_chunk" if getattr(cfg, "logits_chunk", 0) and chunked
                   else "micro_batch_size or max_response_tokens")]
    r_rows = rollout_rows(cfg)
    graphs = getattr(cfg, "rollout_graphs", "off")
    static = backend == "torch" and (graphs == "on" or (graphs == "auto" and "cuda" in device))
    rollout = [Item("KV cache of a rollout batch",
                    kv_cache_bytes(s, r_rows, kv_positions(length, backend), elem),
                    "rollout_batch_size"),
               Item("prefill of a rollout batch", prefill_bytes(s, prefill_rows(cfg, static),
                                                                cfg.max_prompt_tokens, elem),
                    "rollout_batch_size or max_prompt_tokens"),
               Item("rollout logits", 2 * r_rows * s.vocab * 4, "rollout_batch_size")]
    return MemoryPlan(tuple(resident), tuple(update), tuple(rollout), available, device)


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / 2**20:8.1f} MiB"


def describe(p: MemoryPlan) -> list[str]:
    """The plan as lines for the terminal."""
    lines = [f"memory plan ({p.device}):"]
    for title, items in (("held for the run", p.resident), ("update (one micro-batch)", p.update),
                         ("rollouts", p.rollout)):
        lines.append(f"  {title}:")
        lines += [f"    {i.name:<34}{_gib(i.nbytes)}" for i in items]
    phase = "update" if sum(i.nbytes for i in p.update) >= sum(i.nbytes for i in p.rollout) \
        else "rollouts"
    lines.append(f"  {'expected peak (during the ' + phase + ')':<36}{_gib(p.peak)}")
    avail = _gib(p.available) if p.available is not None else "     unknown"
    lines.append(f"  {'available on the device':<36}{avail}")
    return lines


def refusal(p: MemoryPlan) -> str:
    """The one-line reason a plan that does not fit is refused."""
    big = p.largest()
    return (f"the run needs about {p.peak / GiB:.2f} GiB at its peak, the device has "
            f"{(p.available or 0) / GiB:.2f} GiB available; the largest item is {big.name} "
            f"({big.nbytes / GiB:.2f} GiB): shrink it with {big.shrink} "
            "(gft train --dry-run shows the whole plan; check_memory: false skips this check)")


def model_config(cfg, model_path: str | None) -> dict[str, Any] | None:
    """config.json of the run's base model: cfg.model (a resumed LoRA run's model_path is
    its adapter), or the embedded default's; None for a hub id (not downloaded yet)."""
    from pathlib import Path
    from gft.quant import read_config
    if cfg.model is None:
        from gft.tiny import DEFAULT_MODEL, TinyModelSpec, config_dict
        return config_dict(TinyModelSpec(seed=cfg.seed, **DEFAULT_MODEL), cfg.dtype)
    for candidate in (model_path, cfg.model):
        if candidate and (Path(candidate) / "config.json").is_file():
            return read_config(candidate)
    return None
