"""End to end through the real CLI: a tiny random model learns a toy task.

Asserts what a user relies on: every trained parameter changed, losses are finite, the
reward rose, and the saved checkpoint loads in transformers with the same outputs as the
model the run held in memory.
"""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import gft.run
from cli import main
from gft.groups import Sequence_, pad_batch
from gft.tiny import TinyModelSpec, write_tiny_model
from tests.helpers import yes_questions_data

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.mlx)]


@pytest.fixture
def capture_backend(monkeypatch):
    """Keep a handle on the backend the CLI builds, to compare it with what it saved."""
    seen = []
    original = gft.run.open_backend

    def spy(cfg, model_path, *args):
        backend = original(cfg, model_path, *args)
        seen.append(backend)
        return backend
    monkeypatch.setattr(gft.run, "open_backend", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_cli_end_to_end(tmp_path, capture_backend, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=0))
    data = yes_questions_data(tmp_path / "data")
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--model", str(model), "--data", str(data), "-o", str(run),
        "--backend", backend, "--set", "stages=[{sft: 12}, {gft: 6}]", "--set", "learning_rate=1e-2",
        "--set", "prompts_per_step=8", "--set", "prompts_per_minibatch=4",
        "--set", "num_offpolicy=1", "--set", "num_rollouts=3", "--set", "rewards=[exact]",
        "--set", "max_response_tokens=6", "--set", "eval_samples=8", "--set", "eval_every=6",
        "--set", "progress=false", "--set", "save_every=6"])
    assert result.exit_code == 0, result.output
    assert str(run / "final") in result.output

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 18 and all(math.isfinite(r["loss"]) for r in steps)
    evals = [r["eval/reward"] for r in records if "eval/reward" in r]
    assert evals[0] == 0.0 and evals[-1] > 0.5, evals  # the reward rose
    assert [r["preset"] for r in steps] == ["sft"] * 12 + ["gft"] * 6

    # every trained parameter changed
    (trained,) = capture_backend
    before = load_file(str(model / "model.safetensors"))
    after = trained.named_parameters()
    assert set(after) == set(before)
    unchanged = [n for n in after if np.array_equal(after[n], before[n].astype(np.float32))]
    assert not unchanged, unchanged

    # the checkpoint loads in transformers and computes what the in-memory model computes
    import torch
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    seq = Sequence_(0, [81, 117, 101, 115, 116], [121, 101, 115, 258], "yes", on_policy=False)
    batch = pad_batch([seq], pad_id=256, n_tokens=4.0, n_seqs=1.0)
    ours = trained.token_logprobs(batch)
    with torch.no_grad():
        logits = hf(torch.from_numpy(batch.input_ids)).logits[:, :-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(batch.input_ids[:, 1:, None]))
    np.testing.assert_allclose(ours, ref.squeeze(-1).numpy(), rtol=1e-5, atol=1e-5)
    assert (run / "checkpoints" / "latest").exists()


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=0))
    data = yes_questions_data(tmp_path / "data")
    common = ["--model", str(model), "--data", str(data), "--backend", "torch",
              "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
              "--set", "learning_rate=1e-2", "--set", "num_offpolicy=1",
              "--set", "num_rollouts=3", "--set", "rewards=[exact]",
              "--set", "max_response_tokens=6", "--set", "eval_samples=4",
              "--set", "progress=false", "--set", "save_every=2"]
    runner = CliRunner()
    full = runner.invoke(main, ["train", "-o", str(tmp_path / "full"), "--max-steps", "4", *common])
    assert full.exit_code == 0, full.output
    part = runner.invoke(main, ["train", "-o", str(tmp_path / "part"), "--max-steps", "2", *common])
    assert part.exit_code == 0, part.output
    # a run that ended at step 2 is continued to step 4 by raising max_steps on resume
    resumed = runner.invoke(main, ["train", "--resume", str(tmp_path / "part"),
                                   "--set", "max_steps=4"])
    assert resumed.exit_code == 0, resumed.output
    assert "from step-000002 (step 2)" in resumed.output  # final/ holds no optimizer

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bad_data_row_names_file_line_and_field(tmp_path):
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok", "answer": "1"}\n{"prompt": 7, "answer": "2"}\n')
    result = CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(bad),
                                       "--set", "progress=false", "-o", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "prompt" in result.output
    assert "Traceback" not in result.output
