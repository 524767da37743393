"""The CLI surface: help, env, generate, eval, and the embedded default job."""
import json

import pytest
from click.testing import CliRunner

from cli import main
from gft.tasks.arith import ArithTaskConfig, write_task
from gft.tiny import TinyModelSpec, write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "model", TinyModelSpec(seed=1))


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["eval"], ["env"]])
def test_help_is_complete(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command == ["train"]:
        for option in ("--preset", "--backend", "--model", "--data", "--resume", "--set"):
            assert option in result.output


def test_help_config_lists_every_key():
    from gft.config import FIELDS
    result = CliRunner().invoke(main, ["train", "--help-config"])
    assert result.exit_code == 0
    for name in FIELDS:
        assert name in result.output


def test_env_reports_backends():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0
    assert "backend torch: available" in result.output
    assert "--backend auto picks: torch" in result.output


def test_generate_greedy_is_deterministic(model_dir):
    args = ["generate", str(model_dir), "-p", "Hello", "-p", "2+2=", "--max-new-tokens", "5"]
    a = CliRunner().invoke(main, args)
    b = CliRunner().invoke(main, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and len(a.output.splitlines()) >= 1


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_base_with_a_model_that_is_no_adapter_is_refused(model_dir, command):
    """--base names an adapter's base model; with a full model it was ignored in silence,
    so the user sampled another model than the one they named."""
    args = ["-p", "hi"] if command == "generate" else ["--limit", "1"]
    result = CliRunner().invoke(main, [command, str(model_dir), *args, "--base", "elsewhere",
                                       "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: --base elsewhere: {model_dir} is a model, not a LoRA adapter; --base names "
        "the base model under an adapter")


def test_eval_reports_accuracy_and_pass_at_k(model_dir, tmp_path):
    data = write_task(tmp_path / "task", ArithTaskConfig(n_train=8, n_test=6, n_valid=2))
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(data), "-k", "3",
                                       "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0 and "pass@3" in metrics


def test_eval_reads_trl_data_with_a_solution_column_and_rewards_with_options(model_dir,
                                                                            tmp_path):
    """A run can train on TRL's `solution` column (answer_column) and a regex reward with
    its pattern, but gft eval could not score either: 'column answer is missing'."""
    data = tmp_path / "sol.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i}+1?\nA:",
                                        "solution": str(i + 1)}) + "\n" for i in range(3)))
    args = ["eval", str(model_dir), "--data", str(data), "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(main, [*args, "--answer-column", "solution",
                                       "--rewards", "math,exact"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output.strip().splitlines()[-1])) >= {"rewards/math",
                                                                       "rewards/exact"}
    result = CliRunner().invoke(main, [*args, "--rewards", "[{name: regex, pattern: '.'}]"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["rewards/regex"] == 1.0


def test_unknown_key_is_one_line_with_suggestion():
    result = CliRunner().invoke(main, ["train", "--set", "learnig_rate=1"])
    assert result.exit_code == 2
    assert "did you mean 'learning_rate'" in result.output and "Traceback" not in result.output


def test_default_job_runs_offline(tmp_path, monkeypatch):
    # `gft train` with no model and no data: the embedded tiny model and arithmetic task.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--max-steps", "2", "--set", "eval_samples=4",
                                       "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    assert "embedded default" in result.output and "final checkpoint:" in result.output
    run = next((tmp_path / "runs").iterdir())
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "task" / "test.jsonl").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/accuracy" in records[0]
    assert [r["preset"] for r in records if "loss" in r] == ["sft", "sft"]


@pytest.mark.slow
def test_default_job_accuracy_rises(tmp_path, monkeypatch):
    """The README's first command, in full: held-out accuracy must rise from its start."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    acc = [json.loads(x)["eval/accuracy"] for x in (run / "metrics.jsonl").read_text().splitlines()
           if "eval/accuracy" in json.loads(x)]
    assert acc[0] <= 0.05 and acc[-1] >= acc[0] + 0.15, acc


def test_plot_writes_png_per_run_and_overlay(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 0, "eval/accuracy": 0.0}] + [
            {"step": s, "loss": 1.0 / s, "reward/rollout": shift + s / 10, "entropy": 2.0 - s / 10,
             "grad_norm": 1.0, **({"eval/accuracy": s / 10} if s % 2 == 0 else {})}
            for s in range(1, 6)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "overlay.png"
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "a"), str(tmp_path / "b"),
                                       "-o", str(out), "--smooth", "2"])
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "a" / "curves.png", tmp_path / "b" / "curves.png", out):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_a_directory_without_metrics(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_auto_backend_prefers_mlx_on_apple_silicon(monkeypatch):
    import importlib.util
    import platform
    import sys

    import backends
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mlx" else real_find_spec(name, *a))
    assert backends.resolve_backend_name("auto") == "mlx"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert backends.resolve_backend_name("auto") == "torch"
