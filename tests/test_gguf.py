"""A GGUF file (llama.cpp, Ollama, LM Studio) becomes a model directory: `gft convert
MODEL.gguf DIR` (gft/hf_formats.py).

The GGUF here is written the way llama.cpp's convert_hf_to_gguf.py writes a Llama or a
Qwen2 (with its q/k/v biases), with the
`gguf` package's own writer: llama.cpp's tensor names, Q and K rows permuted for its RoPE
layout, the byte tokenizer as a "gpt2" BPE vocabulary, the chat template in the metadata.
What is checked:
- the converted directory computes the original model's logits exactly (float32 tensors),
  its tokenizer gives the same ids, its chat template and special tokens come along, and
  config.json carries the top-level rope_theta mlx-lm needs; mlx-lm loads it with the
  same logits;
- a quantized tensor (Q8_0) is said in a note, and the model stays close;
- `gft train --model MODEL.gguf` is refused in one line naming the conversion; options that
  do not apply to a GGUF file are refused; a file that is not GGUF is refused.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cli import main  # noqa: E402
from gft.tiny import (BOS_ID, CHAT_TEMPLATE, EOS_ID, PAD_ID, SPECIAL_TOKENS, TinyModelSpec,  # noqa: E402
                      bytes_to_unicode, write_tiny_model)

SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, tie_word_embeddings=False)
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its RoPE pairs halves differently from transformers')."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(hf_dir: Path, out: Path, quantize: tuple[str, ...] = ()) -> Path:
    """The HF model in hf_dir as llama.cpp would write it; tensors named in `quantize`
    stored as Q8_0."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    arch = cfg["model_type"]  # llama.cpp's architecture names match these two
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    byte = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([byte[i] for i in range(256)] + list(SPECIAL_TOKENS))
    w.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))  # normal, control
    w.add_token_merges([])
    # transformers recovers merges from scores when the file has none (a byte vocabulary
    # of single characters gives none back)
    w.add_token_scores([0.0] * (256 + len(SPECIAL_TOKENS)))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_pad_token_id(PAD_ID)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        else:
            _, _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            key = f"blk.{i}.{LAYER_NAMES[module]}.{rest[-1]}"  # weight, or qwen2's bias
            if arch == "llama" and module == "self_attn.q_proj":  # only llama's are permuted
                array = llama_cpp_permute(array, cfg["num_attention_heads"])
            elif arch == "llama" and module == "self_attn.k_proj":
                array = llama_cpp_permute(array, cfg["num_key_value_heads"])
        if key in quantize:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(key, gguf.quants.quantize(array, q8),
                         raw_dtype=q8)
        else:
            w.add_tensor(key, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def cli(*args, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("hf") / "model", SPEC)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def each_arch(request, tmp_path_factory) -> Path:
    spec = dataclasses.replace(SPEC, arch=request.param)
    return write_tiny_model(tmp_path_factory.mktemp(request.param) / "model", spec)


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits


def test_a_gguf_file_converts_to_the_model_it_holds(tmp_path, each_arch):
    original = each_arch
    source = write_gguf(original, tmp_path / "tiny.gguf")
    out = cli("convert", source, tmp_path / "converted")
    arch = json.loads((original / "config.json").read_text())["model_type"]
    assert f"wrote {tmp_path / 'converted'}: {arch}," in out
    assert "chat template" in out and "note:" not in out
    ids = torch.tensor([[BOS_ID, 72, 105, 33, 10, 200]])
    assert float((logits(tmp_path / "converted", ids) - logits(original, ids)).abs().max()) == 0
    text = "héllo, wörld!\n"
    got, want = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "converted", original))
    assert got(text, add_special_tokens=False).input_ids == \
        want(text, add_special_tokens=False).input_ids
    assert (got.bos_token, got.eos_token) == ("<s>", "</s>")
    chat = [{"role": "user", "content": "hi"}]
    assert got.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        want.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["rope_theta"] == SPEC.rope_theta and "quantization_config" not in config
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx
    model, _ = mlx_lm.load(str(tmp_path / "converted"))
    np.testing.assert_allclose(np.array(model(mx.array(ids.numpy()))),
                               logits(original, ids).numpy(), atol=1e-4)


def test_quantized_gguf_tensors_are_said_and_stay_close(tmp_path, original):
    source = write_gguf(original, tmp_path / "q8.gguf",
                        quantize=("blk.0.ffn_up.weight", "blk.1.attn_v.weight"))
    out = cli("convert", source, tmp_path / "converted", "--dtype", "bfloat16")
    assert "note: the GGUF weights were quantized (Q8_0)" in out, out
    assert "in bfloat16" in out
    ids = torch.tensor([[BOS_ID, 72, 105, 33]])
    diff = (logits(tmp_path / "converted", ids) - logits(original, ids)).abs().max()
    assert 0 < float(diff) < 0.05  # 8-bit and bf16 rounding, not a different model


def test_a_gguf_file_as_model_or_with_model_options_is_one_line(tmp_path, original):
    source = write_gguf(original, tmp_path / "tiny.gguf")
    out = cli("train", "--model", source, "--max-steps", "1", "-o", tmp_path / "run", code=2)
    assert f"gft convert {source} DIR" in out and "Traceback" not in out
    out = cli("convert", source, tmp_path / "q", "--quantize", "4", code=2)
    assert "second gft convert --quantize" in out
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    out = cli("convert", tmp_path / "fake.gguf", tmp_path / "x", code=2)
    assert "transformers cannot read this GGUF file" in out and "Traceback" not in out
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("x", "q") or
                p.name.startswith((".x.", ".q."))]  # nothing written, no temporary left
