"""Portable checkpoints: one directory that transformers, mlx-lm and gft all load and read
the same way, written identically by both backends, and runs that move between them.

- config.json: every difference found between transformers 5 and mlx-lm 0.32 for Llama,
  Qwen2 and Qwen3 (RoPE base and scaling, tied embeddings, dtype) is removed by
  gft.modelfiles.write_portable_config; configs written by transformers' own save_pretrained
  are read differently by mlx-lm before it and identically after it.
- round trips torch-trained -> mlx-lm -> transformers and mlx-trained -> transformers ->
  mlx-lm on a tiny Llama and a tiny Qwen2 (q/k/v biases), rope_theta 100000: float32 logits
  within 1e-5 on 16 tokens (measured: <= 6.2e-6 between the libraries, logits up to 5;
  0 within one library after the round trip), identical greedy tokens; bfloat16 bit-exact.
- both backends write the same files, shards, index and tensor bytes; their config.json
  differ only in transformers' bookkeeping (transformers_version, a derived layer_types).
- cross-backend resume through the CLI (see test_resume_across_backends for the tolerance).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from backends import SamplingConfig, load_backend  # noqa: E402
from cli import main  # noqa: E402
from gft.modelfiles import write_portable_config  # noqa: E402
from gft.tiny import EOS_ID, PAD_ID, TinyModelSpec, save_tokenizer, write_tiny_model  # noqa: E402
from tests.helpers import batch, say_yes_data, scaled_tiny  # noqa: E402

IDS = np.random.default_rng(0).integers(0, 256, size=(2, 40))
SHORT = IDS[:, :16]  # round trips: 1e-5 holds on 16 tokens (40 tokens reach ~1.2e-5)
LOSS = {"tau": 0.002, "aggregation": "token-mean"}
PROMPTS = [[257, 72, 105], [1, 2, 3, 4, 5], [257, 50, 43, 51, 61]]
GREEDY = SamplingConfig(max_new_tokens=12, greedy=True)


def hf_logits(model_dir: Path, ids: np.ndarray = IDS) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def mlx_logits(model_dir: Path, ids: np.ndarray = IDS) -> np.ndarray:
    model, _ = load_model(Path(model_dir))
    return np.array(model(mx.array(ids.astype(np.int32))).astype(mx.float32))


def hf_saved_model(path: Path, model_type: str, **config) -> Path:
    """A tiny model saved by transformers' own save_pretrained (no gft involved), with
    weights large enough (std 0.1) that a misread config changes the logits visibly."""
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, vocab_size=259,
                max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    return path


CONFIGS = {
    "llama-theta-untied": ("llama", dict(rope_theta=1e5, tie_word_embeddings=False)),
    "llama-theta-tied": ("llama", dict(rope_theta=1e5, tie_word_embeddings=True)),
    "llama-llama3-scaling": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-linear-scaling": ("llama", dict(rope_parameters={
        "rope_type": "linear", "rope_theta": 5e4, "factor": 4.0})),
    "llama-yarn": ("llama", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-head-dim-32-bias": ("llama", dict(rope_theta=1e5, head_dim=32, attention_bias=True,
                                             mlp_bias=True)),
    "qwen2-untied": ("qwen2", dict(rope_theta=1e5, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(rope_theta=1e5, tie_word_embeddings=True)),
    "qwen2-default-theta": ("qwen2", dict()),  # transformers 10000, mlx-lm's qwen2 1e6
    "qwen3-untied": ("qwen3", dict(rope_theta=1e5, head_dim=16, tie_word_embeddings=False)),
    "qwen3-tied-yarn": ("qwen3", dict(head_dim=16, tie_word_embeddings=True, rope_parameters={
        "rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0,
        "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_saved_config_reads_the_same_after_write_portable_config(tmp_path, name):
    model_type, config = CONFIGS[name]
    path = hf_saved_model(tmp_path / name, model_type, **config)
    before_hf = hf_logits(path)
    before_mlx = mlx_logits(path)
    problems = write_portable_config(path)
    assert problems == []
    after_hf, after_mlx = hf_logits(path), mlx_logits(path)
    np.testing.assert_array_equal(after_hf, before_hf)  # transformers reads what it wrote
    assert np.abs(after_mlx - after_hf).max() < 2e-5  # logits of size ~5, 40 positions
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    if not name.startswith("qwen3"):  # mlx-lm's qwen3 reads rope_parameters itself
        assert np.abs(before_mlx - before_hf).max() > 0.1  # the trap this removes


@pytest.mark.parametrize("lm_head", [True, False])
def test_missing_tie_word_embeddings_is_decided_by_the_weights(tmp_path, lm_head):
    """transformers reads a missing key as untied, mlx-lm's llama as tied: with the key
    written from the weights both load the model that is stored."""
    path = hf_saved_model(tmp_path / "m", "llama", rope_theta=1e5, tie_word_embeddings=not lm_head)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(cfg))
    write_portable_config(path)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is (not lm_head)
    assert np.abs(mlx_logits(path) - hf_logits(path)).max() < 2e-5


def test_what_no_config_can_fix_is_reported(tmp_path):
    qwen2 = hf_saved_model(tmp_path / "q2", "qwen2", head_dim=32)
    assert any("head_dim" in p for p in write_portable_config(qwen2))
    qwen3 = hf_saved_model(tmp_path / "q3", "qwen3", head_dim=16, attention_bias=True)
    assert any("attention_bias" in p for p in write_portable_config(qwen3))


def test_config_dtype_follows_the_stored_weights(tmp_path):
    """transformers 5 loads in the config's dtype, mlx-lm in the stored one."""
    path = scaled_tiny(tmp_path / "m", "llama", tied=True, dtype="bfloat16")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "dtype": "float32"}))
    write_portable_config(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16


# ------------------------------------------------------------------------- load as transformers reads it

SAVED = {  # transformers' own save_pretrained: rope_theta only under rope_parameters
    "llama-tied": ("llama", dict(rope_theta=1e5, tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(rope_theta=1e5, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(rope_theta=1e5, tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(rope_theta=1e5, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", SAVED)
def test_a_transformers_saved_directory_trains_the_same_on_both_backends(tmp_path, name):
    """No `gft convert` first: the MLX backend reads the directory as transformers does
    (before, mlx-lm used rope_theta 1e4 here, or 1e6 for Qwen2, and trained another
    model). One step: float32 loss and gradients within the parity tests' 1e-5; the
    checkpoint each backend then writes loads in transformers and mlx-lm alike."""
    model_type, config = SAVED[name]
    path = hf_saved_model(tmp_path / name, model_type, **config)
    save_tokenizer(path)
    cfg_before = (path / "config.json").read_bytes()
    assert "rope_theta" not in json.loads(cfg_before)
    t, m = load_backend("torch", str(path)), load_backend("mlx", str(path))
    assert (path / "config.json").read_bytes() == cfg_before  # the user's file is untouched
    s_t, s_m = t.accumulate_gradients([batch(0)], **LOSS), m.accumulate_gradients([batch(0)], **LOSS)
    assert s_m["loss"] == pytest.approx(s_t["loss"], rel=1e-5)
    g_t, g_m = t.gradients(), m.gradients()
    assert g_t.keys() == g_m.keys()
    assert max(np.linalg.norm(g_m[k] - g_t[k]) / np.linalg.norm(g_t[k]) for k in g_t) < 1e-5
    t.apply_update(1e-3)
    m.apply_update(1e-3)
    t.save_model(tmp_path / "t")
    m.save_model(tmp_path / "m")
    with torch.no_grad():  # each checkpoint against the model its backend holds
        refs = {"t": t.model(torch.from_numpy(SHORT)).logits.numpy(),
                "m": np.array(m.model(mx.array(SHORT.astype(np.int32))))}
    for d, ref in refs.items():
        assert np.abs(hf_logits(tmp_path / d, SHORT) - ref).max() < 1e-5, d
        assert np.abs(mlx_logits(tmp_path / d, SHORT) - ref).max() < 1e-5, d
    assert np.abs(mlx_logits(path, SHORT) - hf_logits(path, SHORT)).max() > 0.1  # the trap


def test_lora_over_a_transformers_saved_base_trains_the_same_on_both_backends(tmp_path):
    """The LoRA base is read the same way (rope_theta 1e5 under rope_parameters only)."""
    from gft.lora import LoraConfig
    path = hf_saved_model(tmp_path / "base", "llama", rope_theta=1e5, tie_word_embeddings=False)
    save_tokenizer(path)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
    t, m = (load_backend(b, str(path), lora=lora) for b in ("torch", "mlx"))
    s_t, s_m = t.accumulate_gradients([batch(0)], **LOSS), m.accumulate_gradients([batch(0)], **LOSS)
    assert s_m["loss"] == pytest.approx(s_t["loss"], rel=1e-5)
    g_t, g_m = t.gradients(), m.gradients()
    assert g_t.keys() == g_m.keys()  # lora_A's gradients are 0 (B starts at 0): absolute
    assert max(np.linalg.norm(g_m[k] - g_t[k]) / max(np.linalg.norm(g_t[k]), 1e-30)
               for k in g_t) < 1e-5
    assert any(np.linalg.norm(g) > 0 for g in g_t.values())


def test_what_mlx_lm_cannot_express_is_refused_in_one_line(tmp_path):
    """A Qwen2 whose head_dim is not hidden/heads: mlx-lm's qwen2 ignores head_dim."""
    path = hf_saved_model(tmp_path / "q2", "qwen2", head_dim=32)
    save_tokenizer(path)
    data = say_yes_data(tmp_path / "data")
    result = CliRunner().invoke(main, ["train", "--backend", "mlx", "--model", str(path),
                                       "--data", str(data), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "Traceback" not in line
    assert str(path / "config.json") in line and "head_dim" in line and "--backend torch" in line
    load_backend("torch", str(path))  # transformers computes it: the torch backend trains it


# ------------------------------------------------------------------------- round trips

def greedy_hf(model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        with torch.no_grad():
            seq = model.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_new_tokens,
                                 do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        row = seq[0, len(p):].tolist()
        out.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_torch_trained_to_mlx_lm_to_transformers(tmp_path, arch, tied):
    base = scaled_tiny(tmp_path / "base", arch, tied)
    t = load_backend("torch", str(base))
    for i in range(2):
        t.train_step([batch(i)], 1e-3, **LOSS)
    t.save_model(tmp_path / "a")
    with torch.no_grad():
        ref = t.model(torch.from_numpy(SHORT)).logits.numpy()
    assert np.abs(mlx_logits(tmp_path / "a", SHORT) - ref).max() < 1e-5  # mlx-lm itself
    m = load_backend("mlx", str(tmp_path / "a"))  # gft on mlx-lm, saving again
    m.save_model(tmp_path / "b")
    assert np.abs(hf_logits(tmp_path / "b", SHORT) - ref).max() < 1e-5
    tokens = t.generate(PROMPTS, GREEDY, 0)
    assert m.generate(PROMPTS, GREEDY, 0) == tokens == greedy_hf(tmp_path / "b")
    assert any(row[-1] == EOS_ID for row in tokens) or arch == "qwen2"


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_mlx_trained_to_transformers_to_mlx_lm(tmp_path, arch, tied):
    base = scaled_tiny(tmp_path / "base", arch, tied)
    m = load_backend("mlx", str(base))
    for i in range(2):
        m.train_step([batch(i)], 1e-3, **LOSS)
    m.save_model(tmp_path / "c")
    ref = np.array(m.model(mx.array(SHORT.astype(np.int32))))
    assert np.abs(hf_logits(tmp_path / "c", SHORT) - ref).max() < 1e-5  # transformers itself
    t = load_backend("torch", str(tmp_path / "c"))  # gft on transformers, saving again
    t.save_model(tmp_path / "d")
    assert np.abs(mlx_logits(tmp_path / "d", SHORT) - ref).max() < 1e-5
    tokens = m.generate(PROMPTS, GREEDY, 0)
    assert t.generate(PROMPTS, GREEDY, 0) == tokens == greedy_hf(tmp_path / "c")
    # transformers' own save_pretrained drops the top-level rope_theta again; importing
    # the directory with `gft convert` makes it portable
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "e")
    assert "rope_theta" not in json.loads((tmp_path / "e" / "config.json").read_text())
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "e"), str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert np.abs(mlx_logits(tmp_path / "f", SHORT) - ref).max() < 1e-5


def tensor_bytes(path: Path) -> dict[str, bytes]:
    """Raw stored bytes per tensor, through torch (int16 view: no float conversion)."""
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                out[k] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
    return out


def test_bfloat16_is_bit_exact_through_both_backends(tmp_path):
    base = scaled_tiny(tmp_path / "base", "qwen2", tied=False, dtype="bfloat16")
    load_backend("torch", str(base), dtype="bfloat16").save_model(tmp_path / "t")
    load_backend("mlx", str(tmp_path / "t"), dtype="bfloat16").save_model(tmp_path / "tm")
    load_backend("torch", str(tmp_path / "tm"), dtype="bfloat16").save_model(tmp_path / "tmt")
    src = tensor_bytes(base)
    for d in ("t", "tm", "tmt"):
        assert tensor_bytes(tmp_path / d) == src, d
        with safe_open(str(tmp_path / d / "model.safetensors"), "pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
        assert json.loads((tmp_path / d / "config.json").read_text())["dtype"] == "bfloat16"
    model, _ = load_model(tmp_path / "tmt")  # and mlx-lm keeps bf16 as stored
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.bfloat16}


# ------------------------------------------------------------------------- shards

def test_both_backends_write_the_same_shards(tmp_path):
    base = scaled_tiny(tmp_path / "base", "qwen2", tied=False)
    t = load_backend("torch", str(base), shard_size="60KB")
    m = load_backend("mlx", str(base), shard_size="60KB")
    t.save_model(tmp_path / "t")
    m.save_model(tmp_path / "m")
    index_t = json.loads((tmp_path / "t" / "model.safetensors.index.json").read_text())
    index_m = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index_t == index_m
    shards = sorted({*index_t["weight_map"].values()})
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "t" / "model.safetensors").exists()
    files = lambda d: sorted(p.name for p in d.iterdir())  # noqa: E731
    assert files(tmp_path / "t") == files(tmp_path / "m")
    cfg_t = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg_m = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "dtype",
                "head_dim", "num_key_value_heads", "max_position_embeddings"):
        assert cfg_t.get(key) == cfg_m.get(key), key
    assert tensor_bytes(tmp_path / "t") == tensor_bytes(tmp_path / "m") == tensor_bytes(base)
    ref = hf_logits(base)
    for d in ("t", "m"):  # both libraries and gft load the sharded directory
        assert np.abs(hf_logits(tmp_path / d) - ref).max() < 1e-5
        assert np.abs(mlx_logits(tmp_path / d) - ref).max() < 1e-5
        again = load_backend("mlx", str(tmp_path / d))
        assert again.generate(PROMPTS, GREEDY, 0) == t.generate(PROMPTS, GREEDY, 0)


# ------------------------------------------------------------------------- resume

def train(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output


def weights(model_dir: Path) -> dict[str, np.ndarray]:
    with safe_open(str(model_dir / "model.safetensors"), "np") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_resume_across_backends(tmp_path):
    """N = 3 SFT steps on one backend, then 3 on the other, equal 6 on the first.

    SFT (no rollouts): sampling draws from each framework's own RNG, so with rollouts the
    two timelines would see different completions and diverge by design. Tolerance (float32,
    lr 1e-2, weights moving up to 0.11 over the run): every weight within 2e-5 and every
    step's loss within a relative 2e-5 (measured: 4.8e-6 and 6e-6, both directions; the two
    backends' float32 rounding, which Adam's normalisation amplifies in small gradients)."""
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=1))
    data = say_yes_data(tmp_path / "data")
    common = ["--model", str(model), "--data", str(data), "--preset", "sft",
              "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=2",
              "--set", "micro_batch_size=2", "--set", "learning_rate=1e-2",
              "--set", "rewards=[exact]", "--set", "max_response_tokens=4",
              "--set", "eval_samples=2", "--set", "progress=false"]
    start = weights(model)
    for first, second in (("torch", "mlx"), ("mlx", "torch")):
        full, part = tmp_path / f"{first}-full", tmp_path / f"{first}-{second}"
        train(["-o", str(full), "--backend", first, "--max-steps", "6", *common])
        train(["-o", str(part), "--backend", first, "--max-steps", "3", *common])
        result = CliRunner().invoke(main, ["train", "--resume", str(part), "--backend", second,
                                           "--set", "max_steps=6"])
        assert result.exit_code == 0, result.output
        assert "from step-000003 (step 3)" in result.output and f"backend: {second}" in result.output
        state = json.loads((part / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
        assert state["backend"] == second and state["config"]["backend"] == second
        a, b = weights(full / "final"), weights(part / "final")
        assert max(np.abs(a[k] - start[k]).max() for k in a) > 0.05  # it trained
        assert max(np.abs(a[k] - b[k]).max() for k in a) < 2e-5, (first, second)
        np.testing.assert_allclose(losses(part), losses(full), rtol=2e-5)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
