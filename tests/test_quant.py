"""Quantized bases (gft/quant.py, gft/quantize.py): a tiny model quantized by mlx-lm to 4 and
8 bits and with a mixed-precision recipe.

What is checked:
- LoRA GFT runs on MLX over each (rollouts and the update through the quantized matmul):
  only the adapters move, the checkpoint holds the PEFT adapter plus a record of the base's
  quantization, and mlx_lm.load(base, adapter_path=...) gives gft's log-probs;
- a full fine-tune of a quantized model, and the torch backend on one, are refused in one line;
- gft convert --quantize / --dequantize and gft fuse (de-quantized or --requantize) round trips;
- an adapter trained over the 4-bit MLX base moves to torch over the full-precision base
  (generate, resume), and back: its log-probs move by about the base's quantization error.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from click.testing import CliRunner  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import gft.run  # noqa: E402
from backends import load_backend  # noqa: E402
from cli import main  # noqa: E402
from gft.lora import LoraConfig  # noqa: E402
from gft.quant import BASE_QUANT_FILE, mlx_quantization, read_config  # noqa: E402
from tests.helpers import batch, say_yes_data, scaled_tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
LOSS = {"tau": 0.002, "aggregation": "token-mean"}


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """base (float32), q4 (group 32), q8 (group 64) by gft convert, and a mixed 3/6-bit
    recipe written by mlx-lm's own converter."""
    from mlx_lm.convert import convert
    root = tmp_path_factory.mktemp("quant")
    out = {"base": scaled_tiny(root / "base")}
    for bits, group in (("4", "32"), ("8", "64")):
        out[f"q{bits}"] = root / f"q{bits}"
        cli("convert", str(out["base"]), str(out[f"q{bits}"]), "--quantize", bits,
            "--group-size", group)
    out["mixed"] = root / "mixed"
    convert(str(out["base"]), str(out["mixed"]), quantize=True, q_group_size=32,
            quant_predicate="mixed_3_6")
    return out


def logprobs_of(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    logits = torch.from_numpy(np.asarray(logits, np.float32))[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(ids)[:, 1:, None]).squeeze(-1).numpy()


def torch_logprobs(model_dir: Path, ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return logprobs_of(model.eval()(torch.from_numpy(ids)).logits.numpy(), ids)


def mlx_lm_logprobs(model_dir: Path, ids: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    from mlx_lm import load
    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return logprobs_of(np.array(model(mx.array(ids.astype(np.int32)))), ids)


def gft_run(tmp_path: Path, model: Path, backend: str = "mlx", steps: int = 2) -> Path:
    data = say_yes_data(tmp_path / "data")
    run = tmp_path / "run"
    cli("train", "-o", str(run), "--backend", backend, "--max-steps", str(steps),
        "--model", str(model), "--data", str(data), "--preset", "gft",
        "--set", "num_offpolicy=1", "--set", "num_rollouts=2",
        "--set", "lora_rank=4", "--set", "lora_alpha=8",
        "--set", "lora_targets=[q_proj, v_proj, down_proj]",
        "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
        "--set", "learning_rate=3e-2", "--set", "rewards=[exact]",
        "--set", "max_response_tokens=4", "--set", "eval_samples=2",
        "--set", "progress=false")
    return run


# ------------------------------------------------------------------------- MLX LoRA

@pytest.mark.parametrize("kind", ["q4", "q8", "mixed"])
def test_lora_gft_run_over_a_quantized_base(models, tmp_path, monkeypatch, kind):
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    seen = []
    original = gft.run.open_backend
    monkeypatch.setattr(gft.run, "open_backend",
                        lambda cfg, path, *a: seen.append(original(cfg, path, *a)) or seen[-1])
    run = gft_run(tmp_path, models[kind])
    be = seen[0]
    q = mlx_quantization(read_config(models[kind]))
    # the model runs through mlx-lm's quantized layers, with the recipe's per-layer bits
    down = be.model.model.layers[1].mlp.down_proj.linear
    assert isinstance(down, nn.QuantizedLinear)
    assert down.bits == q.get("model.layers.1.mlp.down_proj", q)["bits"]
    assert down.group_size == q["group_size"]
    # only the adapters trained: every B moved off zero; the packed weights are the files'
    trained = be.named_parameters()
    assert len(trained) == 12 and all(
        np.abs(v).max() > 0 for k, v in trained.items() if "lora_B" in k)
    stored = mx.load(str(models[kind] / "model.safetensors"))
    packed = {k: v for k, v in tree_flatten(be.model.parameters()) if v.dtype == mx.uint32}
    assert packed and all(mx.array_equal(v, stored[k.replace(".linear.", ".")]).item()
                          for k, v in packed.items())
    final = run / "final"
    record = json.loads((final / BASE_QUANT_FILE).read_text())
    assert record["quantization"] == q and record["format"] == "mlx-lm"
    assert record["base_model"] == str(models[kind])
    # the adapter, in mlx-lm's format, loads in mlx-lm over the quantized base: gft's log-probs
    probe = batch(5)
    ours = be.token_logprobs(probe)
    cli("convert", str(final), str(tmp_path / "mlx-adapter"), "--to", "mlx-lm")
    assert (tmp_path / "mlx-adapter" / BASE_QUANT_FILE).is_file()
    theirs = mlx_lm_logprobs(models[kind], probe.input_ids, tmp_path / "mlx-adapter")
    assert np.abs(theirs - ours).max() < 1e-4


def test_full_fine_tune_of_a_quantized_model_is_refused(models, tmp_path):
    data = say_yes_data(tmp_path / "data")
    out = cli("train", "--backend", "mlx", "--model", str(models["q4"]), "--data", str(data),
              "-o", str(tmp_path / "run"), "--max-steps", "1", code=2)
    assert out.count("\n") == 1 and "set lora_rank" in out and "4-bit" in out


@pytest.mark.mlx
def test_quantization_config_alone_loads_as_quantized(models, tmp_path):
    """A config.json whose mlx-lm quantization is only under "quantization_config" (the
    copy mlx-lm writes beside "quantization"; the older key name) is the same model: gft
    reads it as quantized, so the MLX backend must build it so (bug: "cannot load the
    model: 'quant_method'", mlx-lm's KeyError on that key alone)."""
    import shutil
    alone = tmp_path / "q4"
    shutil.copytree(models["q4"], alone)
    cfg = read_config(alone)
    del cfg["quantization"]
    (alone / "config.json").write_text(json.dumps(cfg))
    probe = batch(4)
    want = load_backend("mlx", str(models["q4"]), lora=LORA).token_logprobs(probe)
    got = load_backend("mlx", str(alone), lora=LORA).token_logprobs(probe)
    assert np.array_equal(got, want)
    assert json.loads((alone / "config.json").read_text()) == cfg  # the user's file as it was
    out = cli("convert", str(alone), str(tmp_path / "dq"), "--dequantize")  # and gft convert
    assert "de-quantized from 4-bit" in out


@pytest.mark.mlx
def test_a_quantized_model_generates_and_evaluates_without_an_adapter(models, tmp_path):
    """Sampling and evaluating a 4-bit base trains nothing (the baseline a Mac user
    measures before fine-tuning): only training refuses a quantized model without LoRA
    (bug: gft eval/generate said 'its packed weights cannot be trained ... set lora_rank')."""
    from mlx_lm import generate, load
    data = say_yes_data(tmp_path / "data")
    out = cli("eval", str(models["q4"]), "--data", str(data), "--limit", "2",
              "--max-new-tokens", "4", "--backend", "mlx", "--rewards", "exact", "--json")
    assert json.loads(out)["n"] == 2
    text = cli("generate", str(models["q4"]), "-p", "Q1: say yes\nA:", "--no-chat-template",
               "--max-new-tokens", "8", "--backend", "mlx")
    model, tok = load(str(models["q4"]))
    ref = generate(model, tok, prompt=tok.encode("Q1: say yes\nA:"), max_tokens=8)
    assert text.rstrip("\n").strip() == ref.strip()  # mlx-lm's own greedy decoding


@pytest.mark.mlx
def test_the_base_record_names_the_base_as_the_adapter_config_does(models, tmp_path,
                                                                  monkeypatch):
    """base_quantization.json's base_model is stored like adapter_config.json's
    base_model_name_or_path (absolute for a local base given relative), not as typed."""
    monkeypatch.chdir(models["q4"].parent)
    load_backend("mlx", "q4", lora=LORA).save_model(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / BASE_QUANT_FILE).read_text())
    peft_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert record["base_model"] == peft_cfg["base_model_name_or_path"] == str(models["q4"].resolve())


def test_torch_backend_on_an_mlx_quantized_model_says_what_to_do(models, tmp_path):
    out = cli("generate", str(models["q8"]), "--backend", "torch", "-p", "hi", code=2)
    assert out.count("\n") == 1 and "--dequantize" in out and "--backend mlx" in out
    assert "8-bit" in out and "Traceback" not in out


# ------------------------------------------------------------------------- convert / fuse

def test_quantize_dequantize_round_trip(models, tmp_path):
    ids = batch(2).input_ids
    ref = torch_logprobs(models["base"], ids)
    err = {}
    for bits, group in ((4, 32), (8, 64)):
        q = read_config(models[f"q{bits}"])["quantization"]
        assert q == {"bits": bits, "group_size": group, "mode": "affine"}
        dq = tmp_path / f"dq{bits}"
        out = cli("convert", str(models[f"q{bits}"]), str(dq), "--dequantize")
        assert "de-quantized" in out and "quantization" not in read_config(dq)
        # the float copy computes what the quantized model computes (transformers vs mlx-lm)
        quantized = mlx_lm_logprobs(models[f"q{bits}"], ids)
        assert np.abs(torch_logprobs(dq, ids) - quantized).max() < 1e-4
        err[bits] = float(np.abs(quantized - ref).max())
    assert 0 < err[8] < err[4]  # 8 bits round the weights less than 4
    # what cannot be done is one line
    assert "already quantized" in cli("convert", str(models["q4"]), str(tmp_path / "x"),
                                      "--quantize", "8", code=2)
    assert "nothing to de-quantize" in cli("convert", str(models["base"]), str(tmp_path / "y"),
                                           "--dequantize", code=2)
    assert "--dequantize" in cli("convert", str(models["q4"]), str(tmp_path / "z"), code=2)


def test_fuse_over_a_quantized_base(models, tmp_path):
    be = load_backend("mlx", str(models["mixed"]), lora=LORA)
    for i in range(3):
        be.train_step([batch(i)], 3e-2, **LOSS)
    be.save_model(tmp_path / "adapter")
    probe = batch(4)
    ours = be.token_logprobs(probe)
    out = cli("fuse", str(tmp_path / "adapter"), str(tmp_path / "fused"))
    assert "de-quantized in full precision" in out
    assert "quantization" not in read_config(tmp_path / "fused")
    fused = torch_logprobs(tmp_path / "fused", probe.input_ids)  # transformers loads it
    assert np.abs(fused - ours).max() < 1e-4
    out = cli("fuse", str(tmp_path / "adapter"), str(tmp_path / "requant"), "--requantize")
    assert "re-quantized as the base" in out
    # the same layout as the base (per-layer bits of the mixed recipe), loaded by mlx-lm
    assert read_config(tmp_path / "requant")["quantization"] == read_config(models["mixed"])["quantization"]
    requant = mlx_lm_logprobs(tmp_path / "requant", probe.input_ids)
    base_err = np.abs(mlx_lm_logprobs(models["mixed"], probe.input_ids)
                      - torch_logprobs(models["base"], probe.input_ids)).max()
    assert np.abs(requant - ours).max() < base_err  # one more rounding, no more than the base's
    assert "not a quantized model" in cli("fuse", str(tmp_path / "adapter"), str(tmp_path / "n"),
                                          "--base", str(models["base"]), "--requantize", code=2)


@pytest.mark.mlx
@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_fuse_and_dequantize_of_a_microscaled_base_stay_in_the_model_dtype(models, tmp_path,
                                                                          mode):
    """mx.dequantize gives bfloat16 for mxfp4/nvfp4 (uint8 scales carry no dtype), whatever
    the model's dtype: a float32 model came back as bfloat16 linears beside float32 norms,
    and gft fuse rounded W + s·B·A to bfloat16, 0.16 off the adapter's logits on this tiny
    model (affine bases: 2e-5). Both now write the model's own dtype (its norms')."""
    from mlx_lm.convert import convert
    from safetensors import safe_open
    base = tmp_path / mode
    convert(str(models["base"]), str(base), quantize=True, q_mode=mode)
    be = load_backend("mlx", str(base), lora=LORA)
    for i in range(3):
        be.train_step([batch(i)], 3e-2, **LOSS)
    be.save_model(tmp_path / "adapter")
    probe = batch(4)
    ours = be.token_logprobs(probe)
    cli("fuse", str(tmp_path / "adapter"), str(tmp_path / "fused"))
    cli("convert", str(base), str(tmp_path / "dq"), "--dequantize")
    for out in ("fused", "dq"):
        with safe_open(str(tmp_path / out / "model.safetensors"), "np") as fh:
            kinds = {fh.get_slice(k).get_dtype() for k in fh.keys()}
        assert kinds == {"F32"}, (out, kinds)
    assert np.abs(torch_logprobs(tmp_path / "fused", probe.input_ids) - ours).max() < 1e-4


# ------------------------------------------------------------------------- to CUDA and back

def test_adapter_moves_between_the_4bit_mlx_base_and_the_full_torch_base(models, tmp_path, capsys):
    run = gft_run(tmp_path, models["q4"], steps=2)
    final = run / "final"
    probe = batch(6)
    on_q4 = load_backend("mlx", str(final)).token_logprobs(probe)
    on_full = torch_logprobs(models["base"], probe.input_ids, adapter=final)  # peft, full base
    base_err = np.abs(mlx_lm_logprobs(models["q4"], probe.input_ids)
                      - torch_logprobs(models["base"], probe.input_ids)).max()
    moved = np.abs(on_full - on_q4).max()
    with capsys.disabled():
        print(f"\n4-bit MLX base -> full torch base: adapter log-probs move {moved:.4f} "
              f"(base alone: {base_err:.4f})")
    assert 0.5 * base_err < moved < 1.5 * base_err  # the move is the base's quantization error
    # gft generate and gft train --resume on torch, over the full-precision base
    cli("generate", str(final), "--backend", "torch", "--base", str(models["base"]),
        "-p", "Q1: say yes\nA:", "--max-new-tokens", "3")
    out = cli("train", "--resume", str(run), "--backend", "torch", "--model", str(models["base"]),
              "--set", "max_steps=3")
    assert "(step 2)" in out and "backend: torch" in out
    # and back: a torch-trained adapter over the 4-bit MLX base
    t = load_backend("torch", str(models["base"]), lora=LORA)
    for i in range(3):
        t.train_step([batch(i)], 3e-2, **LOSS)
    t.save_model(tmp_path / "torch-adapter")
    back = load_backend("mlx", str(tmp_path / "torch-adapter"), base=str(models["q4"]))
    moved_back = np.abs(back.token_logprobs(probe) - t.token_logprobs(probe)).max()
    with capsys.disabled():
        print(f"torch adapter -> 4-bit MLX base: log-probs move {moved_back:.4f}")
    assert 0.5 * base_err < moved_back < 1.5 * base_err


def test_a_checkpoint_transformers_dequantizes_on_load_is_not_refused(tmp_path):
    """quantization_config with dequantize: true (Mxfp4Config(dequantize=True), how
    gpt-oss is fine-tuned) loads as floats: full fine-tuning works; without it, a
    transformers-quantized checkpoint trains LoRA only (found in review)."""
    from gft.errors import ConfigError
    from gft.quant import check_loadable
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4",
                                                          "dequantize": True}}))
    check_loadable("torch", tmp_path, lora=None)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ConfigError, match=r"quantized by transformers \(mxfp4\): its "
                                          r"quantized weights cannot be trained"):
        check_loadable("torch", tmp_path, lora=None)
