"""Tiny local models for tests, examples and the default `gft train` job.

Everything here works offline and imports neither torch nor mlx:
- `byte_tokenizer()` is a byte-level BPE with token id == byte value (no merges), so any
  text round-trips and both transformers and mlx-lm load it with identical ids.
- `write_tiny_model()` writes a randomly initialised Llama or Qwen2 in Hugging Face layout
  (config.json, model.safetensors, tokenizer files, generation_config.json) that
  `transformers.AutoModelForCausalLM`, `AutoTokenizer` and `mlx_lm.load` read unchanged.

Deliberate choices:
- The weights are drawn with NumPy from `spec.seed` and written with a small safetensors
  writer, instead of through torch (`from_config`) or mlx (`Model(args)`). One code path
  means a given seed gives bit-identical weights on a torch-only CUDA box, an MLX-only Mac
  and a machine with both — so cross-backend runs start from the same model.
- config.json carries a top-level `rope_theta` next to transformers 5's `rope_parameters`:
  mlx-lm 0.32 reads only the former and silently falls back to 10000 without it.
- `TinyModelSpec.rope_theta` defaults to 100000, not 10000, so a backend that loses the
  value produces visibly different logits instead of agreeing by accident.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gft.errors import ConfigError

PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # in id order, starting at 256

# One line per message, BOS-delimited; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ bos_token }}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}"
)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
INIT_STD = 0.02  # the initializer_range transformers uses for both architectures

# The default `gft train` job's model (TinyModelSpec fields; gft/run.py writes it, gft/plan.py
# plans it): a byte-level Llama small enough to learn the bundled arithmetic task from
# random init in a few minutes on 2 CPU cores.
# (90k parameters: at this scale a smaller model learns faster per CPU second.)
DEFAULT_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, max_position_embeddings=256)


# --------------------------------------------------------------------------- tokenizer

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character table used by the ByteLevel pre-tokenizer.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points
    256 and up, in byte order. The BPE vocabulary must be keyed by these characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A byte-level tokenizer: id == byte value, specials <pad> <s> </s> at 256, 257, 258.

    No post-processor, so encoding never adds BOS/EOS: `tok("ab").input_ids == [97, 98]`.
    Returns a `transformers.PreTrainedTokenizerFast` with a small chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting is needed when every byte is its own token.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# --------------------------------------------------------------------------- model spec

@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of a tiny randomly initialised causal LM."""
    arch: str = field(default="llama", metadata={"help": "'llama' or 'qwen2' (qwen2 adds q/k/v biases)."})
    hidden_size: int = field(default=64, metadata={"help": "Model width."})
    num_layers: int = field(default=2, metadata={"help": "Number of decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention (query) heads; must divide hidden_size."})
    num_kv_heads: int = field(default=2, metadata={"help": "Key/value heads (GQA); must divide num_heads."})
    intermediate_size: int = field(default=128, metadata={"help": "SwiGLU MLP width."})
    max_position_embeddings: int = field(default=512, metadata={"help": "Longest sequence the config declares."})
    rope_theta: float = field(default=100000.0, metadata={
        "help": "RoPE base. Not 10000 on purpose: a loader that drops it then disagrees visibly."})
    tie_word_embeddings: bool = field(default=True, metadata={
        "help": "Share the input embedding with the output head (no lm_head.weight written)."})
    seed: int = field(default=0, metadata={"help": "Seed of the NumPy generator that draws the weights."})
    vocab_size: int = field(default=259, metadata={
        "help": "Embedding rows; at least 259 (256 bytes + 3 specials). Extra rows are never produced by the tokenizer."})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon."})

    @property
    def head_dim(self) -> int:
        """Per-head width."""
        return self.hidden_size // self.num_heads


def validate_spec(spec: TinyModelSpec) -> None:
    """Raise ConfigError for a spec that neither library could build."""
    if spec.arch not in ARCHITECTURES:
        raise ConfigError(f"tiny model arch must be one of {sorted(ARCHITECTURES)}, got {spec.arch!r}")
    if spec.hidden_size % spec.num_heads:
        raise ConfigError(f"hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}")
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(f"num_heads {spec.num_heads} is not divisible by num_kv_heads {spec.num_kv_heads}")
    if spec.vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError(f"vocab_size must be at least 259 for the byte tokenizer, got {spec.vocab_size}")


def config_dict(spec: TinyModelSpec, dtype: str = "float32") -> dict:
    """The config.json contents: a LlamaConfig / Qwen2Config as a plain dict.

    Written by hand (not via transformers' config classes) so the file is the same whether
    or not torch is installed; both transformers and mlx-lm read every key they need.
    """
    cfg = {
        "architectures": [ARCHITECTURES[spec.arch]],
        "model_type": spec.arch,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "initializer_range": INIT_STD,
        # Both spellings: transformers 5 reads rope_parameters, mlx-lm 0.32 reads rope_theta.
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "use_cache": True,
        "dtype": dtype,
    }
    if spec.arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=spec.num_layers)
    return cfg


# --------------------------------------------------------------------------- weights

def weight_shapes(spec: TinyModelSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter names → shapes, in a fixed order (the draw order)."""
    H, I, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q_out, kv_out = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_out, H)
        shapes[p + "self_attn.k_proj.weight"] = (kv_out, H)
        shapes[p + "self_attn.v_proj.weight"] = (kv_out, H)
        if spec.arch == "qwen2":
            shapes[p + "self_attn.q_proj.bias"] = (q_out,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_out,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_out,)
        shapes[p + "self_attn.o_proj.weight"] = (H, q_out)
        shapes[p + "mlp.gate_proj.weight"] = (I, H)
        shapes[p + "mlp.up_proj.weight"] = (I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes["model.norm.weight"] = (H,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def init_weights(spec: TinyModelSpec) -> dict[str, np.ndarray]:
    """Float32 weights drawn deterministically from spec.seed.

    Matrices and biases ~ N(0, 0.02²) as transformers initialises them (biases are random
    rather than zero so that a loader that ignores them fails the agreement test);
    RMSNorm scales are 1.
    """
    rng = np.random.default_rng(spec.seed)
    weights = {}
    for name, shape in weight_shapes(spec).items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) * INIT_STD).astype(np.float32)
    return weights


_DTYPES = ("float32", "float16", "bfloat16")


def write_safetensors(path: Path, weights: dict[str, np.ndarray], dtype: str) -> None:
    """Write float32 NumPy weights as a safetensors file in `dtype`.

    The {"format": "pt"} metadata is what transformers checks before loading. NumPy has
    no bfloat16, so that dtype is rounded and written by whichever array framework is
    installed (torch, else mlx); float32/float16 go through safetensors' NumPy writer,
    which keeps the file byte-identical on every platform for a given seed.
    """
    meta = {"format": "pt"}
    if dtype != "bfloat16":
        from safetensors.numpy import save_file
        np_dtype = np.float32 if dtype == "float32" else np.float16
        save_file({k: np.ascontiguousarray(v, dtype=np_dtype) for k, v in weights.items()},
                  str(path), metadata=meta)
        return
    try:
        import torch
        from safetensors.torch import save_file as save_torch
        save_torch({k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16)
                    for k, v in weights.items()}, str(path), metadata=meta)
    except ImportError:
        import mlx.core as mx
        mx.save_safetensors(str(path), {k: mx.array(v).astype(mx.bfloat16)
                                        for k, v in weights.items()}, metadata=meta)


# --------------------------------------------------------------------------- directory

def write_tiny_model(path: str | Path, spec: TinyModelSpec = TinyModelSpec(),
                     dtype: str = "float32") -> Path:
    """Write a random-init tiny model + byte tokenizer as a Hugging Face directory.

    The directory holds config.json, model.safetensors, generation_config.json and the
    tokenizer files; it loads with transformers' Auto classes and with `mlx_lm.load`.
    `dtype` is the storage dtype: "float32", "float16" or "bfloat16".
    """
    validate_spec(spec)
    if dtype not in _DTYPES:
        raise ConfigError(f"tiny model dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config_dict(spec, dtype))
    write_json(out / "generation_config.json",
               {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    write_safetensors(out / "model.safetensors", init_weights(spec), dtype)
    save_tokenizer(out)
    write_json(out / "tiny_spec.json", asdict(spec))  # provenance: how this model was made
    return out


def save_tokenizer(path: Path) -> None:
    """Save the byte tokenizer so that AutoTokenizer rebuilds it without extra tokens.

    transformers 5 ignores tokenizer_class for model_type "qwen2" and rebuilds the
    tokenizer as Qwen2Tokenizer (adds an NFC normalizer and Qwen's split regex, both
    harmless for ids here except on non-NFC text), whose default unk_token would add
    "<|endoftext|>" as id 259 — past the 259-row embedding. An explicit null unk_token
    prevents that; the llama path (TokenizersBackend) reads the same file unchanged.
    """
    byte_tokenizer().save_pretrained(str(path))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["unk_token"] = None
    write_json(config_path, config)


def write_json(path: Path, obj: dict) -> None:
    """Pretty-printed JSON with a trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
