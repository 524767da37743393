"""gft/plan.py: the memory plan before training, and `gft train --dry-run`.

What is checked: the weights the plan counts are the bytes the model files hold (float, mlx-lm
4-bit, 8-bit and a mixed recipe), the LoRA count is what the backend trains, the dry run prints
every item, and a config that cannot fit is refused before loading, naming the largest item
and the key that shrinks it. (Measured peaks against the plan: benchmarks/plan_check.py.)
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from gft.config import build_config
from gft.modelfiles import model_weight_files, read_safetensors_header
from gft.plan import lora_params, param_count, plan, shape_of, weight_bytes
from gft.tiny import TinyModelSpec, write_tiny_model
from tests.helpers import say_yes_data

_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}


def stored_bytes(model: Path) -> int:
    total = 0
    for f in model_weight_files(model):
        for k, v in read_safetensors_header(f).items():
            if k != "__metadata__":
                n = _BYTES[v["dtype"]]
                for d in v["shape"]:
                    n *= d
                total += n
    return total


def config(model: Path) -> dict:
    return json.loads((model / "config.json").read_text())


@pytest.mark.parametrize("arch,tied,dtype", [("llama", True, "float32"),
                                             ("qwen2", False, "bfloat16")])
def test_weights_are_the_bytes_the_files_hold(tmp_path, arch, tied, dtype):
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(arch=arch, tie_word_embeddings=tied),
                             dtype=dtype)
    elem = 4 if dtype == "float32" else 2
    assert weight_bytes(shape_of(config(model)), elem) == stored_bytes(model)
    assert param_count(shape_of(config(model))) * elem == stored_bytes(model)


def test_quantized_weights_are_the_bytes_mlx_lm_writes(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.convert import convert as mlx_convert
    from gft.convert import convert
    base = write_tiny_model(tmp_path / "base", TinyModelSpec(arch="qwen2", tie_word_embeddings=False))
    sizes = {}
    for bits, group in ((4, 32), (8, 64)):
        convert(base, tmp_path / f"q{bits}", quantize=bits, group_size=group)
    mlx_convert(str(base), str(tmp_path / "mixed"), quantize=True, q_group_size=32,
                quant_predicate="mixed_3_6")
    for name in ("q4", "q8", "mixed"):
        cfg = config(tmp_path / name)
        from gft.quant import mlx_quantization
        sizes[name] = weight_bytes(shape_of(cfg), 4, mlx_quantization(cfg))
        assert sizes[name] == stored_bytes(tmp_path / name), name
    assert sizes["q4"] < sizes["q8"] < stored_bytes(base)


def test_lora_count_is_what_the_backend_trains(tmp_path):
    pytest.importorskip("mlx_lm")
    from backends import load_backend
    from gft.lora import LoraConfig
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    lora = LoraConfig(4, 8.0, targets=("q_proj", "v_proj", "down_proj"))
    trained = load_backend("mlx", str(model), lora=lora).named_parameters()
    assert lora_params(shape_of(config(model)), 4, ["q_proj", "v_proj", "down_proj"]) == sum(
        v.size for v in trained.values())


def test_plan_items_grow_with_the_keys_that_shrink_them(tmp_path):
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    cfg = build_config({}, {"model": str(model), "data": "x"})
    base = {i.name: i.nbytes for i in plan(config(model), cfg).items}
    double = {i.name: i.nbytes for i in plan(config(model), replace(
        cfg, micro_batch_size=2 * cfg.micro_batch_size,
        rollout_batch_size=2 * cfg.rollout_batch_size)).items}
    for name in ("activations of one micro-batch", "KV cache of a rollout batch"):
        assert double[name] == 2 * base[name]
    chunked = {i.name: i.nbytes for i in plan(config(model), replace(cfg, logits_chunk=64)).items}
    assert chunked["update logits/softmax"] == 3 * 64 * 259 * 4  # [chunk, V] float32, x3
    lora = {i.name: i.nbytes for i in plan(config(model), replace(cfg, lora_rank=4)).items}
    assert lora["AdamW moments"] < base["AdamW moments"] / 10
    ckpt = {i.name: i.nbytes for i in plan(config(model), replace(
        cfg, gradient_checkpointing=True)).items}
    assert ckpt["activations of one micro-batch"] < base["activations of one micro-batch"]


def test_dry_run_prints_the_plan_and_refuses_what_cannot_fit(tmp_path):
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    data = say_yes_data(tmp_path / "data")
    common = ["train", "--model", str(model), "--data", str(data), "--backend", "torch"]
    result = CliRunner().invoke(main, [*common, "--dry-run", "--set", "lora_rank=4"])
    assert result.exit_code == 0, result.output
    for item in ("weights (frozen base)", "LoRA adapters", "gradients", "AdamW moments",
                 "activations of one micro-batch", "update logits/softmax",
                 "KV cache of a rollout batch", "expected peak", "available on the device"):
        assert item in result.output
    assert not (tmp_path / "runs").exists()
    huge = ["--set", "micro_batch_size=200000", "--set", "prompts_per_step=64"]
    result = CliRunner().invoke(main, [*common, "--dry-run", *huge])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert "activations of one micro-batch" in last and "micro_batch_size" in last
    # a real run is refused the same way, before loading; check_memory: false skips that
    result = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "run"), *huge])
    assert result.exit_code == 2 and "largest item is activations" in result.output


def test_rollouts_prefill_each_distinct_prompt_once(tmp_path):
    """Both backends prefill a prompt once and copy its KV rows to its G rollouts
    (gft.groups.shared_prompts): 16 rollouts of one prompt prefill one row; a held-out
    evaluation decodes one row per prompt, so it prefills every row."""
    from gft.plan import prefill_rows
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    grpo = build_config({}, {"model": str(model), "data": "x", "prompts_per_step": 1,
                             "prompts_per_minibatch": 1, "num_rollouts": 16,
                             "rollout_batch_size": 16, "eval_samples": 0})
    assert prefill_rows(grpo) == 1
    # 4 prompts x 4 rollouts in batches of 6 rows: a batch holds parts of up to 3 prompts
    assert prefill_rows(replace(grpo, prompts_per_step=4, num_rollouts=4,
                                rollout_batch_size=6)) == 3
    assert prefill_rows(replace(grpo, eval_samples=10)) == 10  # evaluation: 10 prompts
    assert prefill_rows(grpo, static_cache=True) == 16  # torch's CUDA graphs: every row
    items = {i.name: i.nbytes for i in plan(config(model), grpo).rollout}
    many = {i.name: i.nbytes for i in plan(config(model), replace(
        grpo, prompts_per_step=16, num_rollouts=1)).rollout}
    assert many["prefill of a rollout batch"] == 16 * items["prefill of a rollout batch"]
    assert many["KV cache of a rollout batch"] == items["KV cache of a rollout batch"]
    cuda = {i.name: i.nbytes for i in plan(config(model), grpo, device="torch cuda:0 H200"
                                           ).rollout}
    assert cuda["prefill of a rollout batch"] == many["prefill of a rollout batch"]


def test_mlx_kv_cache_holds_whole_256_position_blocks(tmp_path):
    """mlx-lm's KV cache grows 256 positions at a time: a 77-token sequence holds 256
    positions on MLX, 77 on torch; 257 tokens hold 512."""
    from gft.plan import kv_positions
    assert (kv_positions(77, "mlx"), kv_positions(77, "torch")) == (256, 77)
    assert (kv_positions(256, "mlx"), kv_positions(257, "mlx")) == (256, 512)
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    cfg = build_config({}, {"model": str(model), "data": "x", "max_prompt_tokens": 45,
                            "max_response_tokens": 32})
    kv = {b: {i.name: i.nbytes for i in plan(config(model), cfg, backend=b).rollout}
          ["KV cache of a rollout batch"] for b in ("mlx", "torch")}
    assert kv["mlx"] == kv["torch"] * 256 / 77


def test_a_prompt_shared_by_every_micro_batch_runs_once(tmp_path):
    """With one prompt per optimizer update, every micro-batch holds rows of that prompt's
    group, and the backends run the prompt once (MLX; torch on the CPU): the update's
    activations are for P + B·R positions instead of B·(P + R). With more prompts per update,
    micro-batches sorted by length may mix prompts: the plan keeps B·(P + R)."""
    from gft.plan import update_tokens
    model = write_tiny_model(tmp_path / "m", TinyModelSpec())
    one = build_config({}, {"model": str(model), "data": "x", "prompts_per_step": 1,
                            "prompts_per_minibatch": 1, "micro_batch_size": 8,
                            "max_prompt_tokens": 64, "max_response_tokens": 128})
    assert update_tokens(one, "mlx", "mlx cpu") == 64 + 8 * 128
    assert update_tokens(one, "torch", "torch cpu (host memory)") == 64 + 8 * 128
    assert update_tokens(one, "torch", "torch cuda:0 H200") == 8 * 192  # no sharing there
    two = replace(one, prompts_per_step=2, prompts_per_minibatch=2)
    assert update_tokens(two, "mlx", "mlx cpu") == 8 * 192
    act = {c: {i.name: i.nbytes for i in plan(config(model), cfg, backend="mlx").update}
           ["activations of one micro-batch"] for c, cfg in (("one", one), ("two", two))}
    assert act["one"] == act["two"] * (64 + 8 * 128) / (8 * 192)


def test_a_quantized_mlx_head_is_planned_unchunked(tmp_path):
    """MLX computes a quantized head's logits for the whole micro-batch at once (it cannot
    chunk mlx-lm's quantized embedding): four float32 [B·R, V] arrays, not three of
    [logits_chunk, V]; a float head, or torch's QLoRA (float head), is chunked."""
    pytest.importorskip("mlx_lm")
    from gft.convert import convert
    base = write_tiny_model(tmp_path / "base", TinyModelSpec())
    convert(base, tmp_path / "q4", quantize=4, group_size=32)
    cfg = build_config({}, {"model": str(base), "data": "x", "micro_batch_size": 8,
                            "max_response_tokens": 127, "logits_chunk": 256, "lora_rank": 8})

    def logits(model, backend="mlx"):
        return {i.name: i.nbytes for i in plan(config(model), cfg, backend=backend).update}[
            "update logits/softmax"]
    assert logits(base) == 3 * 256 * 259 * 4
    assert logits(tmp_path / "q4") == 4 * 8 * 128 * 259 * 4
    assert logits(tmp_path / "q4", backend="torch") == 3 * 256 * 259 * 4
