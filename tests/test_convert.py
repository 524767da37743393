"""`gft convert` on model directories: dtype changes (bit-exact, through torch or MLX, never
NumPy), sharding, and importing directories written by transformers or by mlx-lm so that
both libraries read them alike. Adapters and `gft fuse` are in test_lora.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from backends import SamplingConfig, load_backend  # noqa: E402
from cli import main  # noqa: E402
from gft.convert import convert  # noqa: E402
from gft.weights import natural_key, parse_size  # noqa: E402
from gft.errors import ConfigError, ModelError  # noqa: E402
from gft.tiny import TinyModelSpec, init_weights, write_safetensors, write_tiny_model  # noqa: E402

IDS = np.random.default_rng(1).integers(0, 256, size=(2, 16))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    spec = TinyModelSpec(arch="qwen2", tie_word_embeddings=False)
    out = write_tiny_model(tmp_path_factory.mktemp("convert") / "model", spec)
    weights = {k: v if k.endswith("norm.weight") else v * 8 for k, v in init_weights(spec).items()}
    write_safetensors(out / "model.safetensors", weights, "float32")
    return out


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def hf_logits(model_dir: Path) -> np.ndarray:
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(IDS)).logits.numpy()


def mlx_logits(model_dir: Path) -> np.ndarray:
    from mlx_lm.utils import load_model
    m, _ = load_model(Path(model_dir))
    return np.array(m(mx.array(IDS.astype(np.int32))).astype(mx.float32))


def test_sizes_and_natural_order():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1GiB") == 2**30 and parse_size(123) == 123 and parse_size("64kb") == 64_000
    with pytest.raises(ConfigError):
        parse_size("two gigs")
    names = ["model.layers.10.x", "model.layers.2.x", "lm_head.weight", "model.norm.weight"]
    assert sorted(names, key=natural_key) == [
        "lm_head.weight", "model.layers.2.x", "model.layers.10.x", "model.norm.weight"]


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_dtype_change_is_exact_on_either_framework(model, tmp_path, framework):
    convert(model, tmp_path / "bf16", dtype="bfloat16", framework=framework)
    src, bf16 = stored(model), stored(tmp_path / "bf16")
    assert all(torch.equal(bf16[k], src[k].to(torch.bfloat16)) for k in src)  # round to nearest even
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    convert(tmp_path / "bf16", tmp_path / "f32", dtype="float32", framework=framework)
    f32 = stored(tmp_path / "f32")
    assert all(torch.equal(f32[k], bf16[k].float()) for k in src)  # widening is exact
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert np.abs(mlx_logits(tmp_path / "f32") - hf_logits(tmp_path / "f32")).max() < 1e-5


def test_sharding_through_the_cli(model, tmp_path):
    result = CliRunner().invoke(main, ["convert", str(model), str(tmp_path / "s"),
                                       "--shard-size", "50KB"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and not (tmp_path / "s" / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(stored(model))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in stored(model).values())
    for f in files:  # no shard over the limit, unless one tensor alone is
        with safe_open(str(tmp_path / "s" / f), "pt") as fh:
            sizes = [fh.get_tensor(k).numel() * 4 for k in fh.keys()]
        assert sum(sizes) <= 50_000 or len(sizes) == 1
    ref = hf_logits(model)
    assert np.abs(hf_logits(tmp_path / "s") - ref).max() < 1e-5
    assert np.abs(mlx_logits(tmp_path / "s") - ref).max() < 1e-5
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    assert load_backend("mlx", str(tmp_path / "s")).generate([[1, 2, 3]], greedy, 0) == \
        load_backend("torch", str(model)).generate([[1, 2, 3]], greedy, 0)


def test_importing_an_mlx_lm_directory(tmp_path):
    """mlx-lm's own save (metadata {"format": "mlx"}, config copied as mlx-lm read it): a
    transformers-5 config with no top-level rope_theta and no tie_word_embeddings is
    read by mlx-lm as rope_theta 10000 and tied; `gft convert` writes both explicitly."""
    from mlx_lm.utils import load_model, save_config, save_model
    cfg = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96, vocab_size=259,
                               rope_theta=1e5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    ref = hf_logits(tmp_path / "hf")
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    del raw["tie_word_embeddings"]
    mlx_model, _ = load_model(tmp_path / "hf", strict=False, model_config={
        "tie_word_embeddings": False})
    save_model(tmp_path / "mlx", mlx_model)
    save_config(raw, tmp_path / "mlx" / "config.json")
    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "np") as fh:
        assert fh.metadata() == {"format": "mlx"}
    assert np.abs(mlx_logits(tmp_path / "mlx") - ref).max() > 0.1  # misread as it stands

    result = CliRunner().invoke(main, ["convert", str(tmp_path / "mlx"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["rope_theta"] == 1e5 and out["tie_word_embeddings"] is False
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "np") as fh:
        assert fh.metadata() == {"format": "pt"}
    assert np.abs(mlx_logits(tmp_path / "out") - ref).max() < 1e-5
    assert np.abs(hf_logits(tmp_path / "out") - ref).max() < 1e-5


def test_what_convert_refuses(model, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="new or empty"):
        convert(model, tmp_path / "full")
    with pytest.raises(ConfigError, match="adapters"):
        convert(model, tmp_path / "a", to="peft")
    quantized = tmp_path / "q"
    quantized.mkdir()
    cfg = json.loads((model / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**cfg, "quantization": {"bits": 4}}))
    with pytest.raises(ModelError, match="quantized"):
        convert(quantized, tmp_path / "q2")
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80")
    result = CliRunner().invoke(main, ["convert", str(pickled), str(tmp_path / "p2")])
    assert result.exit_code == 2 and "never pickle" in result.output
