"""Tiny model directories load identically in transformers and mlx-lm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gft.errors import ConfigError
from gft.tiny import (BOS_ID, EOS_ID, PAD_ID, TinyModelSpec, byte_tokenizer, init_weights,
                      write_tiny_model)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bytes from every range of the GPT-2 byte table, specials inline, a long enough span for RoPE.
SAMPLE = "Tom has 3 apples and gets 5 more.\nA: 3+5=8. \\boxed{8}</s> café\t~\x01\xff"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """One directory per (arch, tied) combination, written once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {(arch, tied): write_tiny_model(root / f"{arch}-{tied}",
                                           TinyModelSpec(arch=arch, tie_word_embeddings=tied))
            for arch in ("llama", "qwen2") for tied in (True, False)}


def expected_ids(text: str) -> list[int]:
    """Byte ids, with the three special strings replaced by their ids."""
    ids: list[int] = []
    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    while text:
        hit = next((s for s in specials if text.startswith(s)), None)
        if hit:
            ids.append(specials[hit])
            text = text[len(hit):]
        else:
            ids.extend(text[0].encode())
            text = text[1:]
    return ids


# ------------------------------------------------------------------------- tokenizer

def test_byte_tokenizer_ids_are_bytes_and_no_bos_is_added():
    tok = byte_tokenizer()
    assert tok("ab").input_ids == [97, 98]
    assert tok(SAMPLE).input_ids == expected_ids(SAMPLE)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert len(tok) == 259
    assert tok.padding_side == "right"


def test_byte_tokenizer_covers_all_256_bytes_and_round_trips():
    tok = byte_tokenizer()
    text = bytes(range(256)).decode("latin-1")  # every code point 0..255, UTF-8 encoded
    assert tok(text).input_ids == list(text.encode())
    assert tok.decode(tok(SAMPLE).input_ids) == SAMPLE


def test_chat_template():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<s>user: 2+2?\n<s>assistant: 4\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user: 2+2?\n<s>assistant: "
    assert tok(prompt).input_ids[0] == BOS_ID


# ------------------------------------------------------------------------- directory

def test_spec_validation():
    with pytest.raises(ConfigError):
        write_tiny_model("/nonexistent/never", TinyModelSpec(arch="gpt2"))
    with pytest.raises(ConfigError):
        write_tiny_model("/nonexistent/never", TinyModelSpec(num_heads=3))
    with pytest.raises(ConfigError):
        write_tiny_model("/nonexistent/never", TinyModelSpec(vocab_size=100))


def test_config_has_top_level_rope_theta(model_dirs):
    for (arch, tied), path in model_dirs.items():
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["rope_theta"] == TinyModelSpec().rope_theta == 100000.0
        assert cfg["rope_parameters"]["rope_theta"] == 100000.0
        assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is tied
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (257, 258, 256)
        for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (path / name).is_file(), name


def test_weights_are_deterministic_in_the_seed(tmp_path):
    a = write_tiny_model(tmp_path / "a", TinyModelSpec(seed=3))
    b = write_tiny_model(tmp_path / "b", TinyModelSpec(seed=3))
    c = write_tiny_model(tmp_path / "c", TinyModelSpec(seed=4))
    blob = (a / "model.safetensors").read_bytes()
    assert blob == (b / "model.safetensors").read_bytes()
    assert blob != (c / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------- transformers ↔ mlx-lm

def hf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """float32 logits [L, V] from transformers, after checking every weight was loaded."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def mlx_logits(path: Path, ids: list[int]) -> tuple[np.ndarray, object]:
    """float32 logits [L, V] and the tokenizer from mlx_lm.load."""
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load
    model, tokenizer = load(str(path))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32)), tokenizer


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_and_mlx_agree(model_dirs, arch, tied):
    from transformers import AutoTokenizer
    path = model_dirs[(arch, tied)]
    hf_tok = AutoTokenizer.from_pretrained(path)
    ids = hf_tok(SAMPLE).input_ids
    assert ids == expected_ids(SAMPLE)
    assert len(hf_tok) == 259  # qwen2: no "<|endoftext|>" sneaks in at id 259

    theirs, mlx_tok = mlx_logits(path, ids)
    assert mlx_tok.encode(SAMPLE) == ids
    assert mlx_tok.eos_token_id == EOS_ID

    ours = hf_logits(path, ids)
    assert ours.shape == (len(ids), 259)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_heads(model_dirs, tied):
    from safetensors import safe_open
    path = model_dirs[("llama", tied)]
    with safe_open(str(path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is not tied
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    same = torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert same is tied


def test_rope_theta_reaches_mlx(model_dirs, tmp_path):
    """Without the top-level key mlx-lm uses 10000 and the logits move: the agreement
    test above would catch a lost rope_theta (the FIELD-NOTES RoPE trap)."""
    src = model_dirs[("llama", True)]
    ids = expected_ids(SAMPLE)
    good, _ = mlx_logits(src, ids)
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for f in src.iterdir():
        (stripped / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    del cfg["rope_theta"]
    (stripped / "config.json").write_text(json.dumps(cfg))
    bad, _ = mlx_logits(stripped, ids)
    assert np.abs(good - bad).max() > 1e-3


def test_bfloat16_directory_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    spec = TinyModelSpec(arch="qwen2")
    path = write_tiny_model(tmp_path / "bf16", spec, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    want = init_weights(spec)["model.layers.0.self_attn.q_proj.bias"]
    got = model.model.layers[0].self_attn.q_proj.bias.detach().float().numpy()
    np.testing.assert_allclose(got, want, rtol=2 ** -8)
    pytest.importorskip("mlx_lm")
    from mlx_lm import load
    load(str(path))


# ------------------------------------------------------------------------- MLX-only install

NO_TORCH_SCRIPT = textwrap.dedent("""
    import sys
    # A None entry is how a missing package looks to both `import torch` (ImportError) and
    # transformers' availability probe (importlib.util.find_spec -> None). A meta-path
    # finder that raises would also crash that probe, which a real Mac install never does.
    sys.modules["torch"] = None
    from gft.tiny import TinyModelSpec, write_tiny_model
    path = write_tiny_model(sys.argv[1], TinyModelSpec(arch=sys.argv[2]))
    import mlx.core as mx
    from mlx_lm import load
    model, tok = load(str(path))
    assert tok.encode("ab") == [97, 98]
    assert model(mx.array([[257, 97, 98]])).shape == (1, 3, 259)
    assert sys.modules["torch"] is None, "something imported torch"
    print("ok")
""")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_write_without_torch_loads_in_mlx(tmp_path, arch):
    pytest.importorskip("mlx_lm")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    out = tmp_path / "no-torch"
    run = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, str(out), arch], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")
    # Same seed, same bytes, whether or not torch was importable.
    here = write_tiny_model(tmp_path / "with-torch", TinyModelSpec(arch=arch))
    assert (out / "model.safetensors").read_bytes() == (here / "model.safetensors").read_bytes()
