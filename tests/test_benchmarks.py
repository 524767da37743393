"""benchmarks/: the floor arithmetic, and the harness end to end on the tiny model.

No timed assertions: the harness must run and write its table, whatever the numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench import selected, without_repeats  # noqa: E402
from benchmarks.floor import ModelShape, rollout_floor_s, update_floor_s  # noqa: E402

# 10 parameters, 2 layers, 1 KV head of width 2: a KV position costs 2·2·1·2·4 = 32 bytes.
SHAPE = ModelShape(params=10, layers=2, hidden=4, kv_heads=1, head_dim=2, vocab=8)


def test_update_floor_is_six_flops_per_parameter_per_token_plus_attention():
    # Two sequences of 3 and 5 tokens: 6·10·8 = 480 FLOPs of weights;
    # attention 12·layers·hidden·n²/2 = 12·2·4·(9 + 25)/2 = 1632. At 100 FLOP/s: 21.12 s.
    assert update_floor_s(SHAPE, [3, 5], matmul_flops=100.0) == pytest.approx(21.12)
    # the 2 leading tokens both share count once: 6·10·6 = 360 FLOPs of weights; attention
    # 12·2·4/2·((9 - 4) + (25 - 4) + 4) = 1440. At 100 FLOP/s: 18.0 s.
    assert update_floor_s(SHAPE, [3, 5], matmul_flops=100.0, shared_prompt=2) == \
        pytest.approx(18.0)


def test_rollout_floor_adds_prefill_and_per_step_max_of_bytes_and_flops():
    # prompt 4 tokens, completions of 3 and 1 tokens, float32 (40 weight bytes).
    # prefill: 2·10·4·2 rows = 160 FLOPs / 10 = 16 s.
    # decode step t=1: 1 row running, bytes 40 + 32·(4+1) = 200 -> 200 / 100 = 2 s;
    #   FLOPs 2·10·1 = 20 -> 2 s; max 2 s.
    # step t=2: bytes 40 + 32·6 = 232 -> 2.32 s; FLOPs 2 s; max 2.32 s.   Total 20.32 s.
    got = rollout_floor_s(SHAPE, 4, [3, 1], matmul_flops=10.0, bandwidth=100.0, dtype_bytes=4)
    assert got == pytest.approx(20.32)
    assert rollout_floor_s(SHAPE, 4, [], matmul_flops=10.0, bandwidth=100.0) == 0.0
    # both rows from one prompt: one prefill (80 FLOPs -> 8 s), the decode unchanged
    assert rollout_floor_s(SHAPE, 4, [3, 1], matmul_flops=10.0, bandwidth=100.0,
                           distinct_prompts=1) == pytest.approx(12.32)


def test_trainer_selection_by_name_or_prefix():
    assert selected("gft-torch") == ["gft-torch:grpo", "gft-torch:gft"]
    assert selected("trl,sampler") == ["trl:grpo", "sampler"]
    assert "mlx-lm-lora:grpo" in selected("all")
    with pytest.raises(SystemExit):
        selected("nope")


def test_the_floor_uses_the_highest_matmul_rate_measured_in_the_run():
    from benchmarks.bench import settle_floor_rate
    from benchmarks.floor import ModelShape
    from benchmarks.report import summarize
    floor = {"matmul_gflops": 285.0, "bandwidth_gbs": 24.0}
    settle_floor_rate(floor, [336.0, None, 365.0])
    assert floor["matmul_gflops"] == 365.0 and floor["job_gflops"] == 285.0
    assert floor["retimed_gflops"] == [336.0, 365.0]
    shape = ModelShape(params=1_000_000, layers=2, hidden=64, kv_heads=2, head_dim=16, vocab=100)
    step = {"warmup": False, "step_s": 1.0, "rollout_s": 0.5, "update_s": 0.5, "prompt_len": 10,
            "completion_lengths": [20] * 8, "seq_lengths": [30] * 8, "padded_tokens": 240}
    at_max = summarize({"steps": [step]}, shape, floor, 4)["update_floor_s"]
    at_job = summarize({"steps": [step]}, shape, {**floor, "matmul_gflops": 285.0},
                       4)["update_floor_s"]
    assert at_max == pytest.approx(at_job * 285 / 365)  # a stricter floor, not a looser one
    settle_floor_rate(floor, [])  # again, with no re-timing: the job's own rate
    assert floor["matmul_gflops"] == 285.0


def test_harness_runs_on_the_tiny_model_and_writes_its_table(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "benchmarks/bench.py", "--model", "tiny", "--reps", "1",
           "--warmup", "0", "--quick", "--max-new-tokens", "4", "--trainers",
           "gft-torch,gft-torch-mixed", "--out", str(out), "--cache", str(cache)]
    # One thread per job: nothing is timed here, and a shared CI box stays responsive.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (out / "RESULTS.md").read_text()
    assert "Command: `python benchmarks/bench.py --model tiny" in text
    assert "| gft-torch | grpo |" in text and "| gft-torch | gft |" in text
    runs = json.loads((out / "results.json").read_text())["runs"]
    row = runs["tiny-cpu-float32-4tok"]["rows"]["gft-torch:grpo"]["summary"]
    assert row["completions"] == 8 and row["peak_rss"] > 0
    assert row["rollout_floor_s"] > 0 and row["update_floor_s"] > 0
    assert row["info"]["torch_gflops_after"] > 0  # the drift check, and its note
    assert "gft-torch:grpo: the floor's matmul rate again, in that process" in text
    floor = runs["tiny-cpu-float32-4tok"]["floor"]
    assert floor["matmul_gflops"] == max(floor["job_gflops"], *floor["retimed_gflops"])
    assert len(floor["retimed_gflops"]) == 3 and "the highest of these" in text
    gft_row = runs["tiny-cpu-float32-4tok"]["rows"]["gft-torch:gft"]["summary"]
    assert gft_row["completions"] == 4  # 4 rollouts + 4 dataset responses
    if sys.platform.startswith("linux"):  # VmHWM: the update's own peak, below the job's
        assert 0 < row["update_peak_rss"] <= row["peak_rss"]
    mixed = runs["tiny-cpu-float32-4tok"]["rows"]["gft-torch-mixed:gft"]
    assert len(mixed["steps"][0]["seq_lengths"]) == 8  # (all cut to the 4-token cap here)
    assert "| gft-torch-mixed | gft |" in text
    try:
        import matplotlib  # noqa: F401
        assert (out / "results-tiny-cpu-float32-4tok.png").stat().st_size > 0
    except ImportError:
        assert "no chart" in text


def test_decode_products_alone_are_set_against_reading_the_weights_once_per_step():
    from benchmarks.report import products_line
    # 4 decode steps in 0.8 s (median of 0.7, 0.8, 0.9): 0.2 s a step for 2 GB of weights
    # = 10 GB/s; the copy bandwidth (20 GB/s) reads them in 0.1 s: at most 50% of the floor.
    sm = {"times": {"decode_products_alone": [0.9, 0.7, 0.8]}, "decode_steps": 4,
          "tokens": 32, "linear_weight_bytes": 2e9}
    line = products_line(sm, {"bandwidth_gbs": 20.0})
    assert "× 8 rows" in line and "200.0 ms per step" in line and "10.0 GB/s" in line
    assert "100.0 ms" in line and "at most 50% of the bandwidth floor" in line


def test_gpu_memory_is_compared_with_trl_only_where_both_measured_it():
    from benchmarks.report import ratios

    def row(step, rss, gpu):
        return {"summary": {"step_s": step, "peak_rss": rss, "gpu_peak": gpu,
                            "update_frac": 0.5, "rollout_frac": 0.5}}
    on_gpu = ratios({"gft-torch:grpo": row(1.0, 4.0, 3.0), "trl:grpo": row(2.0, 8.0, 4.0)})
    assert on_gpu["gpu_vs_trl"] == 0.75 and on_gpu["rss_vs_trl"] == 0.5
    on_cpu = ratios({"gft-torch:grpo": row(1.0, 4.0, None), "trl:grpo": row(2.0, 8.0, None)})
    assert "gpu_vs_trl" not in on_cpu and on_cpu["step_vs_trl"] == 0.5
    assert "update_rss_vs_trl" not in on_cpu  # neither measured the update alone


def test_the_update_alone_is_compared_with_trl():
    """Issue 19's long-response targets: update peak RSS and update time over TRL's."""
    from benchmarks.report import TARGETS, _meets, ratios

    def row(update_s, update_rss):
        return {"summary": {"step_s": 3.0, "peak_rss": 9.0, "update_s": update_s,
                            "update_peak_rss": update_rss, "update_frac": 0.5,
                            "rollout_frac": 0.5}}
    got = ratios({"gft-torch:grpo": row(30.0, 2.0), "trl:grpo": row(50.0, 6.0)})
    assert got["update_vs_trl"] == pytest.approx(0.6)
    assert got["update_rss_vs_trl"] == pytest.approx(1 / 3)
    assert _meets(got["update_rss_vs_trl"], TARGETS["update_rss_vs_trl"][1]) == "yes"
    assert _meets(0.6, TARGETS["update_rss_vs_trl"][1]) == "**no**"


def test_mixed_workload_responses_differ_in_length_and_the_last_reaches_any_cap():
    from benchmarks import workload
    lengths = [len(r) for r in workload.mixed_responses()]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    assert lengths[-1] > 4 * 2048  # characters: past a 1,024-token cap for any tokenizer
    assert workload.gft_row(mixed=True)["completions"] == workload.mixed_responses()


def test_smollm2_shape_writes_random_weights_beside_carried_config_and_tokenizer(tmp_path):
    """What a machine without the GGUF does: the small files are there, the weights are
    made (seeded, so twice gives the same), and config.json is left as it was carried."""
    from safetensors.torch import load_file
    from benchmarks import models
    tiny = models.prepare_tiny(tmp_path / "tiny")
    shape = tmp_path / "cache" / "smollm2-135m-shape"
    shape.mkdir(parents=True)
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            (shape / f.name).write_bytes(f.read_bytes())
    config_text = (shape / "config.json").read_text()
    assert models.prepare("smollm2-shape", tmp_path / "cache") == shape
    assert (shape / "config.json").read_text() == config_text
    made, real = load_file(shape / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert made.keys() == real.keys()
    assert all(made[k].shape == real[k].shape for k in made)
    first = {k: v.clone() for k, v in made.items()}
    (shape / "model.safetensors").unlink()
    models.prepare("smollm2-shape", tmp_path / "cache")
    again = load_file(shape / "model.safetensors")
    assert all((first[k] == again[k]).all() for k in first)
    assert not (tmp_path / "cache" / "smollm2-135m-shape.tmp").exists()


def test_default_rows_leave_out_what_repeats_another_row_here():
    keys = selected("all")
    assert "gft-torch-eager:grpo" not in without_repeats(keys, "cpu", "float32")
    assert "gft-torch-bf16roll:grpo" in without_repeats(keys, "cpu", "float32")
    on_gpu = without_repeats(keys, "cuda", "bfloat16")
    assert "gft-torch-eager:grpo" in on_gpu and "gft-torch-bf16roll:grpo" not in on_gpu
    assert "gft-torch:grpo" in on_gpu and "trl:grpo" in on_gpu


def test_graph_sampler_line_reports_speed_compile_and_token_agreement():
    from benchmarks.report import graphs_line
    sm = {"times": {"hf_generate": [2.0, 2.2, 1.8], "torch_sampler_graphs": [0.2, 0.25, 0.15]},
          "tokens": 512, "graphs_first_call_s": 31.5, "graphs_rows_equal": 8,
          "graphs_common_prefix": [64] * 8}
    line = graphs_line(sm, 8, "float32")
    assert "0.20 s (2560 tok/s), generate / that = 10.00" in line
    assert "took 31.5 s" in line and "in 8 of 8 rows" in line and "of 64; float32" in line
    failed = graphs_line({**sm, "graphs_failure": "BackendCompilerFailed: no"}, 8, "float32")
    assert failed.startswith("rollout_graphs failed here") and "no." in failed


def test_fixed_completions_are_the_same_full_length_bytes_for_every_trainer():
    from benchmarks.worker import fixed_completions
    a = {"max_new_tokens": 12}
    rows = fixed_completions(a)
    assert rows == fixed_completions(a) and len(rows) == 8
    assert all(len(r) == 12 and all(0 <= t < 256 for t in r) for r in rows)
    assert len({tuple(r) for r in rows}) == 8


def test_fixed_batch_rollout_columns_say_n_a_and_are_not_counted():
    """--fixed-batch hands back fixed ids in microseconds: no rollout ran, so its tok/s
    and floor fraction (once 18,035,075 tok/s, 16,733,327%) are n/a, and its target row
    is not made (it read 'yes')."""
    from benchmarks.report import _rollout_cells, ratios
    s = {"step_s": 3.0, "peak_rss": 9.0, "update_frac": 0.5, "rollout_frac": 167333.27,
         "rollout_tok_s": 18035075.0, "rollout_floor_s": 76.01}
    rows = {"gft-torch:grpo": {"summary": s}}
    assert _rollout_cells(s, fixed_batch=True) == ("n/a", "n/a")
    assert "rollout_vs_bw" not in ratios(rows, fixed_batch=True)
    assert ratios(rows)["rollout_vs_bw"] == 167333.27  # a sampled run keeps its comparison
    assert _rollout_cells(s, fixed_batch=False) == ("18035075", "76.01 (16733327%)")
    nan = float("nan")
    assert _rollout_cells({**s, "rollout_tok_s": nan, "rollout_frac": nan}, False) \
        == ("n/a", "n/a")


def test_a_fast_rollout_keeps_its_floor_and_only_fixed_batch_drops_it():
    """A tiny model's rollout of 4 tokens can take under 10 ms: its floor is still made
    (a rule that guessed --fixed-batch from such times made the harness test flaky)."""
    from benchmarks.floor import ModelShape
    from benchmarks.report import summarize
    shape = ModelShape(params=1_000_000, layers=2, hidden=64, kv_heads=2, head_dim=16, vocab=100)
    step = {"warmup": False, "step_s": 0.02, "rollout_s": 0.005, "update_s": 0.01,
            "prompt_len": 10, "completion_lengths": [4] * 8, "seq_lengths": [14] * 8,
            "padded_tokens": 112}
    floor = {"matmul_gflops": 100.0, "bandwidth_gbs": 20.0}
    sampled = summarize({"steps": [step]}, shape, floor, 4)
    assert sampled["rollout_floor_s"] > 0 and sampled["rollout_tok_s"] == pytest.approx(6400)
    fixed = summarize({"steps": [step]}, shape, floor, 4, fixed_batch=True)
    assert fixed["rollout_floor_s"] != fixed["rollout_floor_s"]  # nan: no rollout ran
    assert fixed["rollout_tok_s"] != fixed["rollout_tok_s"]


def test_mac_report_reads_its_comparison_from_the_rows():
    """MAC.md's sentence on mlx-lm-lora's one-at-a-time differentiation is computed from the
    measured rows (none when either row is missing), and its version from the run's."""
    from benchmarks.mac import peak_for_time
    ours = {"key": "gft-lora-q4", "mlx_peak": 800, "step_s": 100.0}
    theirs = {"key": "mlx-lm-lora-q4", "mlx_peak": 200, "step_s": 250.0}
    assert peak_for_time([ours, theirs]) == (
        ": measured, its MLX peak is 0.25x and its step 2.50x gft's LoRA-over-4-bit row")
    assert peak_for_time([ours]) == ""


def test_mac_dry_run_sets_what_the_measured_config_sets(tmp_path):
    """The `gft train --dry-run` line printed under MAC.md plans the config the row ran:
    building a config from its --set pairs gives the same TrainConfig."""
    from benchmarks.mac import dry_run_command, gft_config
    from gft.config import build_config
    from gft.yamlconfig import parse_override
    cmd = dry_run_command(tmp_path, "gft", 8, 37, 64, "bfloat16")
    sets = dict(parse_override(s.strip()) for s in cmd.split("--set ")[1:])
    from_cli = build_config({}, {"model": str(tmp_path), "data": "unused", "backend": "mlx",
                                 "check_memory": False, **sets})
    assert from_cli == gft_config(tmp_path, "gft", 8, 37, 64, "bfloat16")
