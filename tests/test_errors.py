"""The bad-input catalogue: every mistake a user can make gets one line on stderr that
says what and where (file:line: field where there is one), a non-zero exit code, no
traceback, and nothing already saved is damaged.

Each case goes through the real `gft train` command (click's CliRunner, in process) on
a tiny model. Data loader and config parser internals, and their property-based tests,
live in tests/test_data.py and tests/test_config.py; these tests check what the user sees.
"""
from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from cli import main
from gft.tiny import TinyModelSpec, write_tiny_model

ROWS = [{"prompt": f"Question {i}: is {i} a number?\nA:", "completion": "yes", "answer": "yes"}
        for i in range(8)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("errors") / "model", TinyModelSpec(seed=0))


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def base_args(model: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "-o", str(run),
            "--backend", "torch", "--max-steps", "2", "--set", "prompts_per_step=2",
            "--set", "prompts_per_minibatch=2", "--set", "num_offpolicy=1",
            "--set", "num_rollouts=2", "--set", "rewards=[exact]",
            "--set", "max_response_tokens=4", "--set", "eval_samples=2",
            "--set", "progress=false", "--set", "learning_rate=1e-2", *extra]


def run_cli(args: list[str]):
    return CliRunner().invoke(main, args)


def one_line_error(result, *words: str, code: int = 2) -> str:
    """Exit `code`, not a crash, and exactly one line on stderr holding every word."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    print(lines[0])  # the catalogue, with pytest -s
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def train(model: Path, tmp_path: Path, rows=ROWS, *extra: str):
    data = jsonl(tmp_path / "train.jsonl", rows)
    return run_cli(base_args(model, data, tmp_path / "run", *extra))


# ---------------------------------------------------------------------------------------
# Data


def test_malformed_json_line(model, tmp_path):
    result = train(model, tmp_path, [ROWS[0], '{"prompt": "x", "answer": 1'])
    one_line_error(result, "train.jsonl:2: malformed JSON")


def test_missing_prompt(model, tmp_path):
    result = train(model, tmp_path, [ROWS[0], {"completion": "yes", "answer": "1"}])
    one_line_error(result, "train.jsonl:2: field 'prompt': missing")


def test_empty_prompt(model, tmp_path):
    result = train(model, tmp_path, [ROWS[0], ROWS[1], {"prompt": "  ", "answer": "1"}])
    one_line_error(result, "train.jsonl:3: field 'prompt': empty prompt")


@pytest.mark.parametrize("row, where", [
    ({"prompt": 7, "answer": "1"}, "field 'prompt': must be a string or a list of chat messages, got number"),
    ({"prompt": "p", "completion": ["a"]},
     "field 'completion': must be a string or a list with one assistant message, got array"),
    ({"prompt": "p", "completions": ["a", 3]},
     "field 'completions[1]': must be a string or a list with one assistant message, got number"),
    ({"prompt": "p", "answer": {"x": 1}}, "field 'answer': must be a string or a number, got object"),
    ([1, 2], "a row must be a JSON object, got array"),
])
def test_wrong_types(model, tmp_path, row, where):
    one_line_error(train(model, tmp_path, [ROWS[0], row]), f"train.jsonl:2: {where}")


def test_non_utf8_bytes(model, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n')
    result = run_cli(base_args(model, data, tmp_path / "run"))
    one_line_error(result, "train.jsonl:2: not valid UTF-8 (byte 0xe9)")


def test_empty_data_file(model, tmp_path):
    one_line_error(train(model, tmp_path, []), "train.jsonl: the data file has no rows")


LONG = {"prompt": "Tell me: " + "very " * 40 + "long?\nA:", "completion": "yes", "answer": "yes"}


def test_prompt_over_the_limit_is_an_error_by_default(model, tmp_path):
    result = train(model, tmp_path, [*ROWS[:3], LONG], "--set", "max_prompt_tokens=64")
    one_line_error(result, "train.jsonl:4: field 'prompt': prompt has 217 tokens, more than "
                           "max_prompt_tokens=64 (set prompt_overflow: truncate or skip)")


@pytest.mark.parametrize("policy, counts", [("truncate", "1 truncated, 0 skipped"),
                                            ("skip", "0 truncated, 1 skipped")])
def test_prompt_over_the_limit_truncated_or_skipped_is_counted(model, tmp_path, policy, counts):
    result = train(model, tmp_path, [*ROWS[:3], LONG, LONG], "--max-steps", "1",
                   "--set", "max_prompt_tokens=64", "--set", f"prompt_overflow={policy}")
    assert result.exit_code == 0, result.output
    counts = "2" + counts[1:] if policy == "truncate" else counts.replace("1 skipped", "2 skipped")
    assert f"training prompts over max_prompt_tokens=64: {counts}" in result.output
    assert f"train rows: {3 if policy == 'skip' else 5}" in result.output


def test_every_prompt_skipped(model, tmp_path):
    result = train(model, tmp_path, [LONG], "--set", "max_prompt_tokens=64",
                   "--set", "prompt_overflow=skip")
    one_line_error(result, "no training rows left after prompt_overflow=skip")


@pytest.mark.parametrize("reward", ["math", "exact"])
def test_missing_answer_when_the_reward_needs_it(model, tmp_path, reward):
    rows = [ROWS[0], ROWS[1], {"prompt": "What is 2 plus 2?\nA:", "completion": "4"}]
    result = train(model, tmp_path, rows, "--set", f"rewards=[{reward}]")
    one_line_error(result, f"train.jsonl:3: field 'answer': missing; reward '{reward}' compares")


@pytest.mark.parametrize("preset, stages, where", [
    ("sft", None, "preset 'sft' has num_rollouts=0"),
    ("dft", None, "preset 'dft' has num_rollouts=0"),
    (None, "[{grpo: 1}, {sft: 1}]", "stage 2 (sft) has num_rollouts=0"),
])
def test_no_row_with_a_response_for_a_preset_without_rollouts(model, tmp_path, monkeypatch,
                                                              preset, stages, where):
    import gft.run
    monkeypatch.setattr(gft.run, "open_backend", lambda *a: pytest.fail("model loaded"))
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS]
    extra = ["--preset", preset] if preset else ["--set", f"stages={stages}"]
    result = train(model, tmp_path, rows, *extra, "--set", "num_offpolicy=1",
                   "--set", "num_rollouts=0") if preset else train(model, tmp_path, rows, *extra)
    line = one_line_error(result)
    assert line == (f"error: {tmp_path / 'train.jsonl'}: no training row has a response "
                    "(completion, completions, responses or a final assistant message), and "
                    f"{where}: it learns only from dataset responses. Add responses, or use a "
                    "preset that samples rollouts (grpo, gft)")


def test_rows_without_a_response_under_sft_are_counted(model, tmp_path):
    """Under SFT a row without a response is drawn into a step and trains nothing; when
    only some rows lacked one, the run said nothing about them."""
    rows = [r if i % 2 else {"prompt": r["prompt"], "answer": r["answer"]}
            for i, r in enumerate(ROWS)]
    result = train(model, tmp_path, rows, "--preset", "sft", "--max-steps", "1",
                   "--set", "num_offpolicy=1", "--set", "num_rollouts=0")
    assert result.exit_code == 0, result.output
    assert (f"warning: 4 of 8 training rows have no response (the first: "
            f"{tmp_path / 'train.jsonl'}:1); preset 'sft' has num_rollouts=0 and learns "
            "nothing from them") in " ".join(result.output.split())


def test_dataset_responses_over_max_response_tokens_are_counted(model, tmp_path):
    """A demonstration longer than max_response_tokens is cut there and trained without
    its EOS (the model never learns to stop); the run did it without a word."""
    rows = [{**r, "completion": "yes, it is" if i < 3 else "yes"} for i, r in enumerate(ROWS)]
    result = train(model, tmp_path, rows, "--preset", "sft", "--max-steps", "1",
                   "--set", "num_offpolicy=1", "--set", "num_rollouts=0")
    assert result.exit_code == 0, result.output
    assert ("warning: 3 of 8 training rows have a dataset response over max_response_tokens=4 "
            f"(with its EOS; the first: {tmp_path / 'train.jsonl'}:1): it is trained cut "
            "short, without its end") in " ".join(result.output.split())
    # "yes" + EOS is 4 tokens: within the limit, nothing said
    again = tmp_path / "again"
    again.mkdir()
    result = train(model, again, ROWS, "--preset", "sft", "--max-steps", "1",
                   "--set", "num_offpolicy=1", "--set", "num_rollouts=0")
    assert result.exit_code == 0 and "max_response_tokens" not in result.output
    # a stage's own max_response_tokens is the one that cuts its demonstrations
    staged = tmp_path / "staged"
    staged.mkdir()
    result = train(model, staged, ROWS, "--set",
                   "stages=[{preset: sft, steps: 1, max_response_tokens: 3}]")
    assert result.exit_code == 0, result.output
    assert ("warning: 8 of 8 training rows have a dataset response over max_response_tokens=3"
            ) in " ".join(result.output.split())


def test_resuming_a_finished_run_says_there_is_nothing_to_train(model, tmp_path):
    """It loaded the model, trained nothing and re-exported final/, without a word."""
    result = train(model, tmp_path, ROWS, "--max-steps", "1")
    assert result.exit_code == 0, result.output
    result = run_cli(["train", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert ("note: nothing to train: the run has done 1 steps of its 1; raise max_steps to "
            "train longer (e.g. --set max_steps=101)") in " ".join(result.output.split())


def test_missing_answer_is_fine_for_rewards_that_need_none(model, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": "yes"} for r in ROWS]
    result = train(model, tmp_path, rows, "--max-steps", "1",
                   "--set", "rewards=[{name: regex, pattern: 'y'}]")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------
# User reward functions


REWARDS = '''
import math

def raises(prompts, completions, **kw):
    raise ValueError("the grader is down")

def nan(prompts, completions, **kw):
    return [math.nan] * len(completions)

def none_only(prompts, completions, **kw):
    return [None] * len(completions)

def reads_ground_truth(completions, ground_truth, **kwargs):  # TRL's docs, verbatim
    return [1.0 if c == gt else 0.0 for c, gt in zip(completions, ground_truth)]

def needs_environments(completions, environments, **kwargs):
    return [0.0] * len(completions)

def returns_none(prompts, completions, **kw):
    return None

def too_few(prompts, completions, **kw):
    return [1.0] * (len(completions) - 1)

def hangs(prompts, completions, **kw):
    import time
    time.sleep(3600)

def spins(prompts, completions, **kw):
    while True:  # even swallowing every Exception, it is stopped
        try:
            sum(range(1000))
        except Exception:
            pass
'''


@pytest.mark.parametrize("name, words", [
    # the error names the line that raised, in the user's file (no traceback is shown)
    ("raises", "reward 'REWARDS:raises' raised ValueError at REWARDS:LINE: the grader is down"),
    ("reads_ground_truth", "reward 'REWARDS:reads_ground_truth' takes 'ground_truth', which "
                           "is no column of the data (it can read: answer, completion_ids, "
                           "completions, log_extra, log_metric, prompts, trainer_state); "
                           "add the column, or set "
                           "answer_column: ground_truth if it holds the ground truth"),
    ("needs_environments", "reward 'REWARDS:needs_environments' takes 'environments' "
                           "(TRL's environment instances), which gft does not pass; give it "
                           "a default (e.g. None)"),
    ("nan", "reward 'REWARDS:nan' returned nan for "),
    ("none_only", "returned None (not applicable) for all"),
    ("returns_none", "reward 'REWARDS:returns_none' returned NoneType; expected a list of"),
    ("too_few", "reward 'REWARDS:too_few' returned 5 values; expected 6 (one per completion)"),
])
def test_bad_reward_function(model, tmp_path, name, words):
    module = tmp_path / "my_rewards.py"
    module.write_text(REWARDS)
    result = train(model, tmp_path, ROWS, "--set", f'rewards=["{module}:{name}"]',
                   "--set", "eval_samples=4")
    line = REWARDS.splitlines().index('    raise ValueError("the grader is down")') + 1
    one_line_error(result, words.replace("REWARDS", str(module)).replace("LINE", str(line)))


@pytest.mark.parametrize("name", ["hangs", "spins"])
def test_a_reward_that_never_returns_stops_at_reward_timeout(model, tmp_path, name):
    module = tmp_path / "my_rewards.py"
    module.write_text(REWARDS)
    result = train(model, tmp_path, ROWS, "--set", f'rewards=["{module}:{name}"]',
                   "--set", "reward_timeout=0.5", "--set", "eval_samples=2")
    data = tmp_path / "train.jsonl"
    line = one_line_error(result, f"error: reward '{module}:{name}' did not return within "
                          "reward_timeout=0.5 s on a batch of ", f" responses (rows: {data}:",
                          "); fix the function, or raise reward_timeout (0 = no limit)")
    assert "rows: ?" not in line


def test_unimportable_reward(model, tmp_path):
    result = train(model, tmp_path, ROWS, "--set", "rewards=[no_such_module:f]")
    one_line_error(result, "reward 'no_such_module:f': cannot import 'no_such_module'")


# ---------------------------------------------------------------------------------------
# Config


def test_unknown_key_on_the_command_line(model, tmp_path):
    result = train(model, tmp_path, ROWS, "--set", "learning_rat=0.1")
    one_line_error(result, "command line: unknown key 'learning_rat' (did you mean 'learning_rate'?)")


def test_unknown_key_in_the_yaml_file(model, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("num_rollout: 4\n")
    result = run_cli(["train", str(config), "--model", str(model), "--data", str(tmp_path)])
    one_line_error(result, "job.yaml:1: unknown key 'num_rollout' (did you mean 'num_rollouts'?)")


@pytest.mark.parametrize("sets, words", [
    (["tau=-0.1"], "'tau' must be in [0, 1], got -0.1"),
    (["num_offpolicy=1", "num_rollouts=0", "advantage=grpo"], "a group of one has no baseline"),
    (["num_offpolicy=0", "num_rollouts=0"], "num_offpolicy + num_rollouts = 0"),
    (["learning_rate=abc"], "'learning_rate' must be float, got 'abc'"),
    (["prompts_per_step=3"], "must be a multiple of 'prompts_per_minibatch'"),
    (["preset=grop"], "(did you mean 'grpo'?)"),
    (["device=foo"], "error: 'device' must be auto, cpu, cuda, cuda:N, mps or gpu, got 'foo'"),
    (["adam_beta1=1.5"], "error: 'adam_beta1' must be in [0, 1), got 1.5"),
    (["adam_beta2=-0.1"], "error: 'adam_beta2' must be in [0, 1), got -0.1"),
    (["adam_eps=-1"], "error: 'adam_eps' must be > 0, got -1.0"),
    (["weight_decay=-1"], "error: 'weight_decay' must be >= 0, got -1.0"),
    (["seed=-1"], "error: 'seed' must be in 0 .. 2**63-1, got -1"),
    ([f"seed={2**64}"], f"error: 'seed' must be in 0 .. 2**63-1, got {2**64}"),
    (["warmup_steps=-1"], "error: 'warmup_steps' must be >= 0, got -1"),
    (["save_every=-2"], "error: 'save_every' must be >= 0, got -2"),
    (["epochs=0"], "error: 'epochs' must be > 0, got 0.0"),
    (["reward_timeout=-1"], "error: 'reward_timeout' must be >= 0, got -1.0"),
    (["max_grad_norm=-1"], "error: 'max_grad_norm' must be >= 0, got -1.0"),
    (["lora_dropout=1"], "error: 'lora_dropout' must be in [0, 1), got 1.0"),
    (["reset_optimizer=maybe"], "error: command line: 'reset_optimizer' must be bool, got 'maybe'"),
])
def test_bad_values(model, tmp_path, sets, words):
    extra = [arg for s in sets for arg in ("--set", s)]
    one_line_error(train(model, tmp_path, ROWS, *extra), words)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it(model, tmp_path, monkeypatch):
    import gft.run
    monkeypatch.setattr(gft.run, "open_backend", lambda *a: pytest.fail("model loaded"))
    line = one_line_error(train(model, tmp_path, ROWS, "--set", "device=cuda"))
    assert line.startswith("error: device 'cuda': CUDA is not available on this machine (torch ")
    assert line.endswith("); use device: auto or cpu")


@pytest.mark.parametrize("text, words", [
    (b"1: 2\n", "job.yaml: key 1 is not a name; config keys are names like learning_rate "
                "(see gft train --help-config)"),
    (b"seed: 1\n# caf\xe9\n", "job.yaml:2: not UTF-8 text (byte 0xe9); save the config as UTF-8"),
    (b"- seed: 1\n", "job.yaml: the config must be a mapping of key: value"),
])
def test_bad_yaml_config_files(model, tmp_path, text, words):
    config = tmp_path / "job.yaml"
    config.write_bytes(text)
    one_line_error(run_cli(["train", str(config), "--model", str(model), "--data", str(tmp_path)]),
                   words)


@pytest.mark.parametrize("args, words", [
    (["train", "--seed", "-1"], "error: Invalid value for '--seed': -1 is not in the range "
                                "0<=x<=9223372036854775807. (see main train -h)"),
    (["train", "--max-steps", "0"], "error: Invalid value for '--max-steps': 0 is not in the "
                                    "range x>=1. (see main train -h)"),
    (["generate", "M", "-p", ""], "error: Invalid value for '--prompt' / '-p': prompt 1 is empty; "
                                  "give some text to continue (see main generate -h)"),
    (["generate", "M", "-p", "x", "-n", "0"], "'--num' / '-n': 0 is not in the range x>=1."),
    (["generate", "M", "-p", "x", "--temperature", "nan"],
     "error: Invalid value for '--temperature': 'nan' is not a finite number."),
    (["generate", "M", "-p", "x", "--top-p", "0"], "'--top-p': 0.0 is not in the range 0.0<x<=1.0."),
    (["generate", "M", "-p", "x", "--max-new-tokens", "-1"], "is not in the range x>=1."),
    (["eval", "M", "--limit", "0"], "'--limit': 0 is not in the range x>=1."),
    (["eval", "M", "-k", "0"], "'-k': 0 is not in the range x>=1."),
    (["eval", "M", "--temperature", "0"], "'--temperature': 0.0 is not in the range x>0.0."),
    (["plot", ".", "--smooth", "0"], "'--smooth': 0 is not in the range x>=1."),
    (["train", "--nproc", "0"], "'--nproc': 0 is not in the range x>=1."),
    (["generate"], "error: Missing argument 'MODEL'. (see main generate -h)"),
    (["train", "--no-such-option"], "error: No such option '--no-such-option'. (see main train -h)"),
])
def test_bad_command_line_options_are_one_line(args, words):
    one_line_error(run_cli(args), words)


# ---------------------------------------------------------------------------------------
# Model directories


def copy_model(model: Path, to: Path) -> Path:
    import shutil
    return Path(shutil.copytree(model, to))


def test_model_without_weights(model, tmp_path):
    broken = copy_model(model, tmp_path / "m")
    (broken / "model.safetensors").unlink()
    one_line_error(run_cli(base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")),
                   f"{broken}: no model weights (model.safetensors)")


def test_model_with_truncated_weights(model, tmp_path):
    broken = copy_model(model, tmp_path / "m")
    with open(broken / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    one_line_error(run_cli(base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")),
                   "model.safetensors: corrupted or truncated safetensors file")


def test_model_with_only_pickle_weights_is_not_loaded(model, tmp_path):
    broken = copy_model(model, tmp_path / "m")
    (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
    one_line_error(run_cli(base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")),
                   "only pickle weights (pytorch_model.bin); gft loads safetensors only")


@pytest.mark.parametrize("backend, words", [
    ("torch", ["the weights do not match the model config.json describes: 29 missing, would be "
               "randomly initialized (lm_head.weight, transformer.h.0.attn.c_attn.bias, "
               "transformer.h.0.attn.c_attn.weight, ...); 20 unexpected, would be ignored "
               "(model.embed_tokens.weight, ",
               "check config.json (model_type, architectures, sizes) against the weight files"]),
    ("mlx", ["cannot load the model: Received 20 parameters not in model"]),
])
def test_config_naming_another_architecture_than_its_weights(model, tmp_path, monkeypatch,
                                                             backend, words):
    """A Llama's weights under a GPT-2 config.json: never a randomly initialized model."""
    # MLX refuses gpt2 before reading weights (not measured equal: tests/test_archs.py);
    # lifted here so that the check of the weights against the config is what answers
    monkeypatch.setenv("GFT_MLX_UNVERIFIED", "1")
    broken = copy_model(model, tmp_path / "m")
    (broken / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
        "n_head": 4, "vocab_size": 259, "n_positions": 256, "n_ctx": 256,
        "layer_norm_epsilon": 1e-5, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 256}))
    args = base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")
    args[args.index("--backend") + 1] = backend
    one_line_error(run_cli(args), f"error: {broken}: ", *words)
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.parametrize("name, text, words", [
    ("config.json", "[1, 2]", ": must be a JSON object (key: value), got a list"),
    ("config.json", "{", ":1: invalid JSON: Expecting property name"),
    ("tokenizer_config.json", "7", ": must be a JSON object (key: value), got a int"),
    ("adapter_config.json", '"peft"', ": must be a JSON object (key: value), got a str"),
])
@pytest.mark.parametrize("command", ["train", "generate"])
def test_model_json_files_that_are_not_objects(model, tmp_path, name, text, words, command):
    broken = copy_model(model, tmp_path / "m")
    (broken / name).write_text(text)
    args = (base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")
            if command == "train" else ["generate", str(broken), "-p", "hi"])
    one_line_error(run_cli(args), f"error: {broken / name}", words)


@pytest.mark.parametrize("config, words", [
    ({"r": "x"}, "adapter_config.json: 'r' must be a positive integer, got 'x'"),
    ({"r": 4, "lora_alpha": None}, "adapter_config.json: 'lora_alpha' must be a finite number, "
                                   "got None"),
    ({"r": 4, "target_modules": 5}, "adapter_config.json: 'target_modules' must be a list of "
                                    "module names, got 5"),
    ({"r": 4, "base_model_name_or_path": 7}, "adapter_config.json: 'base_model_name_or_path' "
                                             "must be a path or hub id, got 7"),
])
@pytest.mark.parametrize("command", ["generate", "convert", "fuse"])
def test_bad_adapter_configs(model, tmp_path, config, words, command):
    from safetensors.numpy import save_file
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(model), "target_modules": ["q_proj"], **config}))
    args = {"generate": ["generate", str(adapter), "-p", "hi"],
            "convert": ["convert", str(adapter), str(tmp_path / "out")],
            "fuse": ["fuse", str(adapter), str(tmp_path / "out")]}[command]
    one_line_error(run_cli(args), f"error: {adapter}/{words}")


def test_plot_skips_a_damaged_metrics_line_with_a_warning(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = ['{"step": 1, "entropy": 1.0}', '{"step": 2, "entr', '[3]', '{"step": "x"}',
             '{"step": 4, "entropy": "high"}', '{"step": 5, "entropy": 0.5}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = (run / "metrics.jsonl").read_bytes()
    result = run_cli(["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"warning: {run}/metrics.jsonl:{n}: damaged line skipped (not a JSON object with a "
        "numeric 'step')" for n in (2, 3, 4)]
    assert (run / "curves.png").stat().st_size > 0
    assert (run / "metrics.jsonl").read_bytes() == before  # plotting never rewrites it


def test_missing_model_directory(tmp_path):
    result = run_cli(base_args(tmp_path / "nowhere" / "model", jsonl(tmp_path / "d.jsonl", ROWS),
                               tmp_path / "r"))
    one_line_error(result, "no such model directory")


def test_tokenizer_without_eos(model, tmp_path):
    broken = copy_model(model, tmp_path / "m")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    one_line_error(run_cli(base_args(broken, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r")),
                   "the tokenizer has no EOS token")


def test_tokenizer_without_pad_uses_eos(model, tmp_path):
    from gft.modelfiles import load_tokenizer
    broken = copy_model(model, tmp_path / "m")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(broken))
    assert tok.pad_token_id == tok.eos_token_id


def test_remote_code_is_refused_by_default(model, tmp_path):
    evil = copy_model(model, tmp_path / "m")
    marker = tmp_path / "code-ran"
    config = json.loads((evil / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                "AutoModelForCausalLM": "modeling_evil.Evil"})
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = run_cli(base_args(evil, jsonl(tmp_path / "d.jsonl", ROWS), tmp_path / "r"))
    one_line_error(result, "contains custom code")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Checkpoints: incompatible, full disk, non-finite steps


@pytest.fixture
def saved_run(model, tmp_path):
    """A 2-step run that saved step-000001, step-000002 (the last, resumable) and final/."""
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    run = tmp_path / "run"
    result = run_cli(base_args(model, data, run, "--set", "save_every=1"))
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.parametrize("change, words", [
    (lambda t: {k: np.zeros((3, 3), np.float32) if i == 0 else v for i, (k, v) in enumerate(t.items())},
     "has shape [3, 3], the model's is"),
    (lambda t: {k.replace("model.", "transformer."): v for k, v in t.items()},
     "which the model does not have (checkpoint from a different model?)"),
])
def test_resume_with_optimizer_state_of_another_model(saved_run, change, words):
    path = saved_run / "checkpoints" / "step-000002" / "optimizer.safetensors"
    save_file(change(load_file(str(path))), str(path))
    one_line_error(run_cli(["train", "--resume", str(saved_run), "--set", "max_steps=3"]),
                   "step-000002/optimizer.safetensors: optimizer state for", words)


def test_resume_with_the_weights_of_another_model(saved_run, tmp_path):
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(seed=0, hidden_size=32))
    last = saved_run / "checkpoints" / "step-000002"
    (last / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    one_line_error(run_cli(["train", "--resume", str(saved_run), "--set", "max_steps=3"]),
                   "step-000002/optimizer.safetensors: optimizer state for", "the model's is")


def resume(run: Path, *extra: str):
    return run_cli(["train", "--resume", str(run), "--set", "max_steps=3", *extra])


def test_resume_finds_the_newest_complete_checkpoint_whatever_latest_says(saved_run):
    """`latest` naming an older step (or missing, or naming one that is gone: see
    tests/test_checkpoint.py): the newest complete one, step-000002, is used, and no
    checkpoint is deleted but the one keep_checkpoints=2 prunes."""
    (saved_run / "checkpoints" / "latest").write_text("step-000001\n")
    result = resume(saved_run)
    assert result.exit_code == 0, result.output
    assert f"resuming {saved_run} from step-000002 (step 2)" in result.output
    assert sorted(p.name for p in (saved_run / "checkpoints").iterdir()) == [
        "latest", "step-000002", "step-000003"]


def test_resume_without_latest_does_not_start_over(saved_run):
    (saved_run / "checkpoints" / "latest").unlink()
    result = resume(saved_run)
    assert result.exit_code == 0, result.output
    assert f"resuming {saved_run} from step-000002 (step 2)" in result.output


def test_resume_skips_a_newest_checkpoint_without_optimizer_state_and_says_so(saved_run):
    last = saved_run / "checkpoints" / "step-000002"
    (last / "optimizer.safetensors").unlink()
    result = resume(saved_run)
    assert result.exit_code == 0, result.output
    assert (f"warning: step-000002 is incomplete ({last}/optimizer.safetensors: missing); "
            "resuming from the previous complete checkpoint step-000001") in result.output
    assert f"resuming {saved_run} from step-000001 (step 1)" in result.output


def test_resume_without_optimizer_state_is_refused_unless_reset_optimizer(saved_run):
    import shutil
    shutil.rmtree(saved_run / "checkpoints" / "step-000001")
    (saved_run / "checkpoints" / "step-000002" / "optimizer.safetensors").unlink()
    line = one_line_error(resume(saved_run))
    assert line == (f"error: cannot resume: {saved_run}/checkpoints/step-000002/optimizer."
                    "safetensors: missing; to continue from step-000002 with fresh optimizer "
                    "state, add --set reset_optimizer=true")
    result = resume(saved_run, "--set", "reset_optimizer=true")
    assert result.exit_code == 0, result.output
    assert "reset_optimizer=true: continuing from step-000002 with fresh optimizer state" \
        in result.output
    import yaml
    assert yaml.safe_load((saved_run / "config.yaml").read_text())["reset_optimizer"] is False


def test_resume_with_damaged_trainer_state_names_the_file(saved_run):
    import shutil
    shutil.rmtree(saved_run / "checkpoints" / "step-000001")
    (saved_run / "checkpoints" / "step-000002" / "trainer_state.json").write_text("{")
    one_line_error(resume(saved_run, "--set", "reset_optimizer=true"),
                   f"error: cannot resume: {saved_run}/checkpoints/step-000002/trainer_state.json:"
                   " unreadable trainer state", "; no complete checkpoint to resume from")


def test_resume_without_a_run(tmp_path):
    one_line_error(run_cli(["train", "--resume", str(tmp_path)]),
                   "no checkpoint and no config.yaml to resume from")


def test_a_new_run_refuses_a_directory_with_checkpoints(saved_run, model):
    one_line_error(run_cli(base_args(model, saved_run.parent / "d.jsonl", saved_run)),
                   "already holds a run with checkpoints; continue it with gft train --resume")


def test_full_disk_while_saving(model, tmp_path, monkeypatch):
    """The disk fills up in the middle of the second checkpoint: one line, exit 2, the
    first checkpoint is intact and the run resumes from it to the same result."""
    from backends.torch_backend import TorchBackend
    data = jsonl(tmp_path / "d.jsonl", ROWS)
    full = run_cli(base_args(model, data, tmp_path / "full", "--max-steps", "3"))
    assert full.exit_code == 0, full.output

    original, calls = TorchBackend.save_model, []

    def save_model(self, path):
        calls.append(path)
        original(self, path)
        if len(calls) == 2:
            with open(Path(path) / "model.safetensors", "r+b") as f:
                f.truncate(100)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))
    monkeypatch.setattr(TorchBackend, "save_model", save_model)
    run = tmp_path / "run"
    result = run_cli(base_args(model, data, run, "--max-steps", "3", "--set", "save_every=1"))
    line = one_line_error(result, "cannot save checkpoint", "step-000002: No space left on device",
                          "step-000001 is intact", f"gft train --resume {run}", code=1)
    assert "[ENOSPC]" in line
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000001"]
    monkeypatch.undo()

    resumed = run_cli(["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "from step-000001 (step 1)" in resumed.output
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(run / "final" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_full_disk_while_logging(model, tmp_path, monkeypatch):
    from gft.metrics import MetricsLog

    def write(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
    monkeypatch.setattr(MetricsLog, "write", write)
    result = train(model, tmp_path, ROWS)
    one_line_error(result, "error: No space left on device: ", "metrics.jsonl", code=1)


def test_non_finite_steps_are_skipped_then_stop_the_run(model, tmp_path, monkeypatch):
    """Two non-finite steps in a row (max_bad_steps=2) stop the run with a clear line; the
    skipped steps made no update, and the last checkpoint is intact."""
    from backends.torch_backend import TorchBackend
    original, calls = TorchBackend.accumulate_gradients, []

    def accumulate(self, *a, **kw):
        stats = original(self, *a, **kw)
        calls.append(1)
        return {**stats, "loss": math.nan} if len(calls) > 1 else stats
    monkeypatch.setattr(TorchBackend, "accumulate_gradients", accumulate)
    run = tmp_path / "run"
    result = train(model, tmp_path, ROWS, "--max-steps", "5", "--set", "save_every=1",
                   "--set", "max_bad_steps=2")
    one_line_error(result, "2 steps in a row had a non-finite loss or gradient",
                   "last good checkpoint intact")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s.get("skipped") for s in steps if "loss" in s] == [0.0, 1.0, 1.0]
    from gft.checkpoint import latest_checkpoint
    assert latest_checkpoint(run).name == "step-000002"  # saved after the skipped step 2
    a = load_file(str(run / "checkpoints" / "step-000001" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-000002" / "model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)  # no update from a non-finite step


def test_a_batch_no_reward_covers_stops_only_a_run_where_none_ever_applied():
    """Every reward returning None for a whole batch is a misconfigured reward when it
    happens before any reward applied (stop at once, as test_bad_reward_function's
    none_only shows); after rewards have applied, it is mixed-task data drawn unluckily
    (rows of a task no reward covers) and stopping would lose a long run for it: TRL
    warns and goes on, and so does gft, saying how often."""
    from types import SimpleNamespace
    from gft.errors import RewardError
    from gft.run import RequireApplicableReward

    class Scorer:  # a RewardModel scoring math rows and returning None for code rows
        names = ["math"]

        def score(self, prompts, completions, columns, sources=None, **kwargs):
            return SimpleNamespace(n_none=sum(t == "code" for t in columns["task"]))

    def batch(task: str) -> tuple:
        return ["p"] * 4, ["c"] * 4, {"task": [task] * 4}, [f"data.jsonl:{i}" for i in range(4)]

    said: list[str] = []
    fresh = RequireApplicableReward(Scorer(), warn=said.append)
    fresh.score(*batch("code"))
    with pytest.raises(RewardError, match=r"returned None .* for all 4 responses of a batch "
                                          r"\(first: data.jsonl:0\); nothing to learn"):
        fresh.settle()  # the loop's check once every rank has scored its share
    scorer = RequireApplicableReward(Scorer(), warn=said.append)
    scorer.score(*batch("math"))
    scorer.settle()
    for _ in range(150):
        assert scorer.score(*batch("code")).n_none == 4  # scored, not raised
        scorer.settle()
    assert len(said) == 2 and "the run goes on (1 such batch so far" in said[0]
    assert "(100 such batches so far" in said[1]
