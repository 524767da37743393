"""Coming from TRL: its reward functions, its dataset types, and honest evaluation.

The reward functions below are copied unchanged from TRL's GRPOTrainer documentation
("Using a custom reward function"), plus one reading `trainer_state` and one `async def`
(TRL 1.16 awaits async reward functions, all of a batch's together). They run through
gft's RewardModel, and through a short `gft train` on the torch and the MLX backend.
Every TRL dataset type that carries a prompt is loaded, and its tokens are compared with
what `tokenizer.apply_chat_template` gives.
"""
from __future__ import annotations

import asyncio
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from cli import main
from gft.data import load_split
from gft.metrics import read_metrics
from gft.errors import DataError, RewardError
from gft.rewards import TrainerState, build_rewards
from gft.rollout import build_groups, encode_prompt, prepare_prompts
from gft.tiny import TinyModelSpec, write_tiny_model

# Verbatim from TRL's documentation (GRPOTrainer, "Using a custom reward function").
TRL_REWARDS = textwrap.dedent(r'''
    import asyncio
    import re


    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]


    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]


    def reward_func(completions, ground_truth, **kwargs):
        # Regular expression to capture content inside \boxed{}
        matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
        contents = [match.group(1) if match else "" for match in matches]
        # Reward 1 if the content is the same as the ground truth, 0 otherwise
        return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


    def token_count_reward(completion_ids, **kwargs):
        """Reward function that assigns higher scores to longer completions (in terms of token count)."""
        return [float(len(ids)) for ids in completion_ids]


    def step_reward(completions, trainer_state, **kwargs):
        return [float(trainer_state.global_step) + trainer_state.epoch for _ in completions]


    async def async_len_reward(completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(completion)) for completion in completions]
''')

SYSTEM = {"role": "system", "content": "Answer in the format <think>...</think><answer>...</answer>"}


@pytest.fixture(scope="module")
def rewards_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trl") / "trl_rewards.py"
    path.write_text(TRL_REWARDS)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("trl-model") / "model", TinyModelSpec(seed=0))


@pytest.fixture(scope="module")
def tokenizer(model):
    return AutoTokenizer.from_pretrained(model)


def reward(rewards_file: Path, name: str):
    return build_rewards([f"{rewards_file}:{name}"])


# ---------------------------------------------------------------------------------------
# The calling convention, one function at a time


def test_length_reward_on_standard_data(rewards_file):
    result = reward(rewards_file, "reward_len").score(
        ["p", "p"], ["x" * 20, "x" * 5], {})
    assert result.total.tolist() == [0.0, -15.0]


def test_format_reward_reads_conversational_completions(rewards_file):
    prompt = [SYSTEM, {"role": "user", "content": "2+2?"}]
    result = reward(rewards_file, "format_reward_func").score(
        [prompt, prompt], ["<think>easy</think><answer>4</answer>", "4"], {})
    assert result.total.tolist() == [1.0, 0.0]


def test_extra_column_by_name(rewards_file):
    result = reward(rewards_file, "reward_func").score(
        ["p"] * 3, [r"so \boxed{4}", r"\boxed{5}", "4"], {"ground_truth": ["4", "4", "4"]})
    assert result.total.tolist() == [1.0, 0.0, 0.0]


def test_completion_ids_and_trainer_state(rewards_file):
    ids = reward(rewards_file, "token_count_reward").score(
        ["p", "p"], ["ab", "abc"], {}, completion_ids=[[1, 2, 258], [1, 2, 3, 258]])
    assert ids.total.tolist() == [3.0, 4.0]
    state = reward(rewards_file, "step_reward").score(
        ["p"], ["a"], {}, trainer_state=TrainerState(global_step=7, epoch=0.5))
    assert state.total.tolist() == [7.5]


def test_what_a_reward_function_receives():
    """Everything TRL passes, by keyword: the full chat prompt (system turn included),
    TRL's completion messages, ids, the state and each column; strings for plain data."""
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    model = build_rewards("exact")
    model.functions, model.names = [spy], ["spy"]
    chat = [SYSTEM, {"role": "user", "content": "2+2?"}]
    model.score([chat, "plain"], ["4", "5"], {"answer": ["4", "5"], "level": [1, 2]},
                completion_ids=[[52, 258], [53]], trainer_state=TrainerState(3, 1.25, 9))
    assert seen["prompts"] == [chat, "plain"]
    assert seen["completions"] == [[{"role": "assistant", "content": "4"}], "5"]
    assert seen["completion_ids"] == [[52, 258], [53]]
    assert seen["trainer_state"] == TrainerState(3, 1.25, 9)
    assert seen["answer"] == ["4", "5"] and seen["level"] == [1, 2]


def test_a_function_without_kwargs_gets_only_what_it_names():
    def strict(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer)]

    model = build_rewards("exact")
    model.functions, model.names = [strict], ["strict"]
    assert model.score(["p"], ["4"], {"answer": ["4"], "other": [1]}).total.tolist() == [1.0]


def test_builtins_take_conversational_completions():
    chat = [{"role": "user", "content": "2+2?"}]
    model = build_rewards(["exact", "math", {"name": "regex", "pattern": "4"}])
    result = model.score([chat, chat], ["4", "5"], {"answer": ["4", "4"]})
    assert result.per_function["exact"].tolist() == [1.0, 0.0]
    assert result.per_function["math"].tolist() == [1.0, 0.0]
    assert result.per_function["regex"].tolist() == [1.0, 0.0]


def test_async_functions_are_awaited_together(rewards_file):
    """Two async rewards that each wait for the other: they finish only when run
    concurrently (as TRL runs them with asyncio.gather)."""
    events: dict[str, asyncio.Event] = {}

    def waiter(mine: str, theirs: str):
        async def reward(completions, **kwargs):
            events.setdefault(mine, asyncio.Event()).set()
            await asyncio.wait_for(events.setdefault(theirs, asyncio.Event()).wait(), 5)
            return [1.0] * len(completions)
        return reward

    model = build_rewards(["exact", "exact"])
    model.functions = [waiter("a", "b"), waiter("b", "a")]
    assert model.score(["p"], ["x"], {"answer": ["y"]}).total.tolist() == [2.0]
    assert reward(rewards_file, "async_len_reward").score(
        ["p", "p"], ["ab", "abc"], {}).total.tolist() == [2.0, 3.0]


def test_async_failure_is_named():
    async def broken(completions, **kwargs):
        raise ValueError("judge unreachable")

    model = build_rewards("exact")
    model.functions, model.names = [broken], ["judge"]
    with pytest.raises(RewardError) as excinfo:
        model.score(["p"], ["x"], {"answer": ["x"]})
    line = broken.__code__.co_firstlineno + 1
    assert f"reward 'judge' raised ValueError at {__file__}:{line}: judge unreachable" \
        in str(excinfo.value)


def test_async_functions_keep_to_reward_timeout():
    async def slow(completions, **kwargs):
        await asyncio.sleep(30)

    model = build_rewards("exact", timeout=0.2)
    model.functions, model.names = [slow], ["slow_judge"]
    with pytest.raises(RewardError, match="'slow_judge' did not return within reward_timeout"):
        model.score(["p"], ["x"], {"answer": ["x"]}, sources=["d.jsonl:1"])


def test_metric_names_are_the_function_names(rewards_file):
    model = build_rewards([f"{rewards_file}:reward_len", "exact", "exact"])
    assert model.log_names == ["reward_len", "exact", "exact#2"]


# ---------------------------------------------------------------------------------------
# TRL's dataset types: rendered tokens equal apply_chat_template's


def chat_ids(tokenizer, messages, **kw) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, **kw)["input_ids"])


def load_one(tmp_path: Path, row: dict, **kw):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return load_split(path, **kw)[0]


CHAT = [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
REPLY = {"role": "assistant", "content": "<think>2+2=4</think><answer>4</answer>"}


@pytest.mark.parametrize("kind, row", [
    ("conversational prompt-only", {"prompt": CHAT}),
    ("conversational prompt-completion", {"prompt": CHAT, "completion": [REPLY]}),
    ("conversational messages", {"messages": CHAT + [REPLY]}),
])
def test_conversational_types_render_as_the_chat_template(tmp_path, tokenizer, kind, row):
    example = load_one(tmp_path, row)
    prompt_ids = encode_prompt(example, tokenizer, chat_template=None)
    assert prompt_ids == chat_ids(tokenizer, CHAT, add_generation_prompt=True)
    if "prompt-only" in kind:
        assert example.responses == ()
        return
    (seq,) = build_groups([example], [prompt_ids], [], tokenizer=tokenizer, num_offpolicy=1,
                          num_rollouts=0, max_response_tokens=256)
    # the trained sequence is the templated conversation up to the reply, then EOS
    full = chat_ids(tokenizer, CHAT + [REPLY])
    trained = seq.prompt_ids + seq.response_ids
    assert trained[:-1] == full[:len(trained) - 1]
    assert trained[-1] == tokenizer.eos_token_id


def test_a_prefilled_prompt_renders_as_trl_renders_it(tmp_path, tokenizer):
    """A conversational prompt ending with an assistant turn: TRL continues that turn
    (continue_final_message); gft closed it and opened a new assistant turn."""
    data_utils = pytest.importorskip("trl.data_utils")
    prefilled = CHAT + [{"role": "assistant", "content": "<think>"}]
    example = load_one(tmp_path, {"prompt": prefilled})
    trl_text = data_utils.apply_chat_template({"prompt": prefilled}, tokenizer)["prompt"]
    assert encode_prompt(example, tokenizer, chat_template=None) == \
        tokenizer(trl_text, add_special_tokens=False)["input_ids"]
    assert trl_text.endswith("<think>")


@pytest.mark.parametrize("row, field", [
    ({"prompt": CHAT[1:] + [SYSTEM]}, "prompt[1].role"),
    ({"prompt": [SYSTEM], "completion": [REPLY]}, "prompt[0].role"),
    ({"messages": CHAT + [REPLY, SYSTEM]}, "messages[3].role"),
])
def test_a_prompt_ending_with_a_system_message_is_refused(tmp_path, tokenizer, row, field):
    """A response follows a user or tool turn, or continues an assistant prefill; TRL
    raises on any other last role. gft rendered a generation prompt after the system
    message and trained the response as its answer."""
    data_utils = pytest.importorskip("trl.data_utils")
    if "prompt" in row:  # TRL's own decision on the same row
        with pytest.raises(ValueError, match="Invalid role in the last message: system"):
            data_utils.apply_chat_template(row, tokenizer)
    with pytest.raises(DataError, match=rf"/rows.jsonl:1: field '{re.escape(field)}': the "
                                        "prompt ends with a 'system' message; "):
        load_one(tmp_path, row)
    # and gft generate's chat prompt, checked as a data row is
    result = CliRunner().invoke(main, ["generate", "nowhere", "-p", json.dumps(
        CHAT[1:] + [SYSTEM])])
    assert result.exit_code == 2 and result.output.startswith(
        "error: --prompt:1: field 'prompt[1].role': the prompt ends with a 'system' message")


# TRL's tool-calling rows: an assistant turn that only calls a tool has no content
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "name": "get_weather", "content": "22C"}]


@pytest.mark.parametrize("null_filled", [False, True])
def test_tool_calling_messages_render_as_the_chat_template(tmp_path, tokenizer, null_filled):
    """A tool-call turn without content was refused ('messages[1].content: missing'); a
    Parquet or save_to_disk copy of the same rows has content null (datasets fills
    absent keys), refused too."""
    chat = [dict(m) for m in TOOL_CHAT]
    if null_filled:
        chat = [{"content": None, "tool_calls": None, "name": None, **m} for m in chat]
    example = load_one(tmp_path, {"messages": chat + [{"role": "assistant",
                                                        "content": "It is 22C."}]})
    assert example.responses == ("It is 22C.",)
    assert encode_prompt(example, tokenizer, chat_template=None) == \
        chat_ids(tokenizer, chat, add_generation_prompt=True)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("columns", [{"tools": TOOLS}, {"tools": json.dumps(TOOLS)},
                                     {"chat_template_kwargs": {"enable_thinking": False}}])
def test_tools_and_chat_template_kwargs_columns_reach_the_template(tmp_path, tokenizer,
                                                                   columns):
    """TRL's SFTTrainer and mlx-lm's chat data render a row's `tools` (tool schemas, a
    list or a JSON string) and `chat_template_kwargs` into its prompt; gft left them out,
    so a tool-calling prompt lost the schemas it was written against."""
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
                         "{% if enable_thinking is defined %}thinking: {{ enable_thinking }}\n"
                         "{% endif %}" + tokenizer.chat_template)
    example = load_one(tmp_path, {"messages": TOOL_CHAT + [{"role": "assistant",
                                                            "content": "22C."}], **columns})
    kwargs = dict(columns.get("chat_template_kwargs", {}))
    if "tools" in columns:
        kwargs["tools"] = TOOLS
    expected = chat_ids(tok, TOOL_CHAT, add_generation_prompt=True, **kwargs)
    assert expected != chat_ids(tok, TOOL_CHAT, add_generation_prompt=True)
    assert encode_prompt(example, tok, chat_template=None) == expected


@pytest.mark.parametrize("columns, field", [({"tools": "not json"}, "tools"),
                                            ({"tools": [1]}, "tools"),
                                            ({"chat_template_kwargs": "x"},
                                             "chat_template_kwargs")])
def test_bad_tools_or_template_kwargs_name_the_row(tmp_path, tokenizer, columns, field):
    example = load_one(tmp_path, {"prompt": TOOL_CHAT[:1], **columns})
    with pytest.raises(DataError, match=rf"rows.jsonl:1: field '{field}': "):
        encode_prompt(example, tokenizer, chat_template=None)


@pytest.mark.parametrize("row, field", [
    ({"messages": TOOL_CHAT[:1] + TOOL_CHAT[1:2]}, "messages[1].tool_calls"),
    ({"prompt": TOOL_CHAT[:1], "completion": TOOL_CHAT[1:2]}, "completion[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
     "messages[1].content"),
])
def test_a_response_that_calls_a_tool_is_refused(tmp_path, row, field):
    with pytest.raises(DataError, match=rf"rows.jsonl:1: field '{re.escape(field)}': "):
        load_one(tmp_path, row)


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": CHAT, "chosen": [REPLY], "rejected": [REPLY]},
    {"chosen": CHAT + [REPLY], "rejected": CHAT + [REPLY]},
])
def test_preference_rows_are_refused(tmp_path, row):
    """README: preference rows (chosen / rejected) are refused. With an explicit prompt
    they were read as a prompt-only row plus two columns: gft trained on the prompt
    alone (GRPO, GFT) and never saw the chosen response."""
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'chosen': a preference row"):
        load_one(tmp_path, row)


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2+2?"},
    {"prompt": "What is 2+2?", "completion": " 4"},
])
def test_standard_types(tmp_path, tokenizer, row):
    example = load_one(tmp_path, row)
    # raw completion by default (as TRL does for standard data) ...
    assert encode_prompt(example, tokenizer, chat_template=None) == \
        tokenizer(row["prompt"]).input_ids
    # ... or as one user turn with chat_template: true
    assert encode_prompt(example, tokenizer, chat_template=True) == \
        chat_ids(tokenizer, [{"role": "user", "content": row["prompt"]}],
                 add_generation_prompt=True)
    assert example.responses == ((row["completion"],) if "completion" in row else ())


def test_answer_column(tmp_path):
    example = load_one(tmp_path, {"prompt": "p", "solution": "42"}, answer_column="solution")
    assert example.answer == "42" and example.columns["solution"] == "42"
    # a row with 'answer' but not the named column: it said the row "has both"
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'solution': missing: "
                                        r"answer_column 'solution' reads the ground truth "
                                        r"from this column, and the row has 'answer' instead"):
        load_one(tmp_path, {"prompt": "p", "answer": "42"}, answer_column="solution")
    with pytest.raises(DataError, match=r"field 'answer': the row has both"):
        load_one(tmp_path, {"prompt": "p", "answer": "4", "solution": "4"},
                 answer_column="solution")


# ---------------------------------------------------------------------------------------
# Through `gft train` on both backends


def train(model: Path, data: Path, run: Path, backend: str, *sets: str):
    args = ["train", "--model", str(model), "--data", str(data), "-o", str(run),
            "--backend", backend, "--max-steps", "1", "--set", "prompts_per_step=2",
            "--set", "prompts_per_minibatch=2", "--set", "max_response_tokens=6",
            "--set", "progress=false", "--set", "learning_rate=1e-3"]
    for item in sets:
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result, read_metrics(run / "metrics.jsonl")


def backends():
    out = ["torch"]
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
        out.append("mlx")
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", backends())
def test_trl_rewards_train_on_conversational_data(tmp_path, model, rewards_file, backend):
    reply = "<think>2+2=4</think><answer>4</answer>"
    rows = [{"prompt": [SYSTEM, {"role": "user", "content": f"Q{i}"}],
             "completion": [{"role": "assistant", "content": reply}]} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, records = train(model, data, tmp_path / "run", backend,
                       f"rewards=[{rewards_file}:format_reward_func, "
                       f"{rewards_file}:token_count_reward, {rewards_file}:async_len_reward]",
                       "num_offpolicy=1", "num_rollouts=2", "eval_samples=0",
                       "max_response_tokens=48")
    (step,) = [r for r in records if r["step"] == 1]
    # the dataset reply has the format, its ids are its bytes + EOS, its text 38 characters
    assert step["rewards/format_reward_func/dataset"] == 1.0
    assert step["rewards/token_count_reward/dataset"] == len(reply) + 1
    # as in TRL, a conversational completion is a list of one message: len() is 1
    assert step["rewards/async_len_reward/dataset"] == 1.0
    # rollouts are scored too, and logged apart (48 tokens at most, EOS included)
    assert 1 <= step["rewards/token_count_reward/rollout"] <= 48
    assert "eval/accuracy" not in step  # eval_samples: 0 turns evaluation off


@pytest.mark.parametrize("backend", backends())
def test_trl_rewards_train_on_standard_data(tmp_path, model, rewards_file, backend):
    rows = [{"prompt": f"Q{i}:", "completion": r" \boxed{4}", "ground_truth": "4"}
            for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, records = train(model, data, tmp_path / "run", backend,
                       f"rewards=[{rewards_file}:reward_func, {rewards_file}:reward_len, "
                       f"{rewards_file}:step_reward]",
                       "num_offpolicy=1", "num_rollouts=2", "eval_samples=0")
    (step,) = [r for r in records if r["step"] == 1]
    assert step["rewards/reward_func/dataset"] == 1.0
    assert step["rewards/reward_len/dataset"] == -abs(20 - len(r" \boxed{4}"))
    assert step["rewards/step_reward/dataset"] == 0.0  # global_step 0, epoch 0 at step 1
    assert step["reward/dataset"] == 1.0 - 10.0 + 0.0


@pytest.mark.parametrize("backend", backends())
def test_sft_needs_no_answer_and_reports_held_out_loss(tmp_path, model, backend):
    rows = [{"prompt": f"Q{i}:", "completion": " yes"} for i in range(10)]  # no answer
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, records = train(model, data, tmp_path / "run", backend, "preset=sft",
                            "eval_holdout=0.2")
    assert "2 of 10 training rows set aside" in result.output
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["eval/n"] == 2 and first["eval/loss"] > 0
    # " yes" + EOS = 5 target tokens per held-out row
    assert first["eval/loss_tokens"] == 10 and last["eval/loss"] > 0
    assert not any(k.startswith(("reward", "accuracy", "eval/accuracy")) for k in last)


def test_a_single_file_is_not_called_held_out(tmp_path, model):
    rows = [{"prompt": f"Q{i}:", "completion": " yes", "answer": "yes"} for i in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result, records = train(model, data, tmp_path / "run", "torch", "rewards=[exact]")
    assert "evaluation: off" in result.output and "no held-out split" in result.output
    assert not any(k.startswith("eval/") for r in records for k in r)
    # eval_data names another file: it is evaluated, and said so
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps(rows[0]) + "\n")
    result, records = train(model, data, tmp_path / "run2", "torch", "rewards=[exact]",
                            f"eval_data={held}")
    assert f"1 held-out rows from eval_data {held}" in result.output
    assert records[0]["eval/n"] == 1 and "eval/accuracy" in records[0]


def test_prepare_prompts_of_every_type_together(tmp_path, tokenizer):
    rows = [{"prompt": CHAT}, {"prompt": "plain"}, {"messages": CHAT + [REPLY]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = prepare_prompts(load_split(path), tokenizer, chat_template=None,
                               max_prompt_tokens=4096, overflow="error")
    expected = chat_ids(tokenizer, CHAT, add_generation_prompt=True)
    assert prepared.prompt_ids[0] == expected == prepared.prompt_ids[2]
    assert np.array_equal(prepared.prompt_ids[1], tokenizer("plain").input_ids)


# ---------------------------------------------------------------------------------------
# TRL and mlx-lm key names


@pytest.mark.parametrize("key, words", [
    ("num_generations", ["'num_generations'", "num_rollouts"]),
    ("max_completion_length", ["max_response_tokens"]),
    ("gradient_accumulation_steps", ["prompts_per_minibatch", "micro_batch_size"]),
    ("per_device_train_batch_size", ["micro_batch_size"]),
    ("beta", ["no KL"]),
    ("epsilon", ["no PPO ratio clipping"]),
    ("iters", ["max_steps"]),
    ("batch_size", ["prompts_per_step"]),
    ("adapter_path", ["output_dir"]),
    # keys of TRL's example scripts' YAML (ModelConfig, ScriptArguments): no pointer before
    ("model_name_or_path", ["gft's model"]),
    ("dataset_name", ["gft's data", "Hugging Face Hub id (org/name"]),
    ("dataset_config", ["org/name:config"]),
    ("dataset_test_split", ["eval_split"]),
    ("torch_dtype", ["gft's dtype"]),
    ("use_peft", ["lora_rank"]),
    ("lora_r", ["lora_rank"]),
    ("top_k", ["temperature and top_p only"]),
])
def test_trl_and_mlx_lm_names_point_at_gft_keys(tmp_path, key, words):
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: 1\n")
    result = CliRunner().invoke(main, ["train", str(config)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    line = result.stderr.strip()
    assert "\n" not in line and "unknown key" in line and str(config) in line
    for word in words:
        assert word in line, line


def test_a_stage_key_gets_the_hint_too():
    from gft.config import build_config
    from gft.errors import ConfigError
    with pytest.raises(ConfigError, match=r"stages\[0\]: unknown key 'num_generations'.*"
                                          "num_rollouts"):
        build_config({"model": "m", "stages": [{"preset": "grpo", "steps": 2,
                                                 "num_generations": 4}]})


def test_every_hint_names_real_gft_keys():
    import re
    from gft.config import FIELDS, FOREIGN_KEYS
    for key, hint in FOREIGN_KEYS.items():
        for name in re.findall(r"gft's (\w+)", hint):
            assert name in FIELDS, (key, name)


# ---------------------------------------------------------------------------------------
# The project's own documents


def test_help_config_shows_every_default():
    from gft.config import FIELDS, TrainConfig
    text = CliRunner().invoke(main, ["train", "--help-config"]).output
    defaults = TrainConfig()
    for name in FIELDS:
        value = getattr(defaults, name)
        shown = {None: "unset", True: "true", False: "false"}.get(value, None) \
            if value is None or isinstance(value, bool) else \
            json.dumps(value) if isinstance(value, list) else str(value)
        assert f"  {name} (default: {shown})\n" in text, name
    assert "GFT.md" not in text


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.stderr.strip() == ('error: gft plot needs matplotlib, which is not '
                                     'installed: pip install "gft[plot]"')


def test_the_documents_cited_are_in_the_repository():
    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "ALGORITHM.md").is_file()
    for path in [root / "README.md", root / "cli.py", *sorted((root / "gft").glob("*.py"))]:
        assert "GFT.md" not in path.read_text(), path


# ---------------------------------------------------------------------------------------
# Where held-out rows come from (gft.run.held_out_rows), without a model


def rows_file(path: Path, n: int, tag: str = "t") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag}{i}", "completion": "x"}) + "\n"
                            for i in range(n)))
    return path


def held_out(data: Path, **keys):
    from gft.config import build_config
    from gft.run import held_out_rows
    cfg = build_config({"model": "m", "data": str(data), **keys})
    return held_out_rows(cfg, load_split(cfg.data, "train"))


def test_held_out_from_a_directory_split_or_a_split_name(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows_file(data / "train.jsonl", 6)
    rows_file(data / "valid.jsonl", 2, "v")
    rows_file(data / "dev.jsonl", 3, "d")
    train_rows, rows, note = held_out(data)  # no test split: valid
    assert len(train_rows) == 6 and [r.prompt for r in rows] == ["v0", "v1"]
    assert "'valid' split" in note
    _, rows, note = held_out(data, eval_data="dev")  # a split name of the directory
    assert [r.prompt for r in rows] == ["d0", "d1", "d2"] and "eval_data dev" in note
    _, rows, note = held_out(data, eval_samples=0)
    assert rows == [] and note == "off (eval_samples: 0)"


def test_eval_holdout_sets_rows_aside(tmp_path):
    data = rows_file(tmp_path / "train.jsonl", 20)
    train_rows, rows, note = held_out(data, eval_holdout=0.25)
    assert len(rows) == 5 and len(train_rows) == 15
    assert not {r.prompt for r in rows} & {r.prompt for r in train_rows}  # never trained on
    assert "5 of 20 training rows set aside" in note
    assert [r.prompt for r in held_out(data, eval_holdout=0.25)[1]] == [r.prompt for r in rows]
    _, none, note = held_out(data)
    assert none == [] and note.startswith("off:") and "no held-out split" in note


def test_eval_data_that_names_nothing(tmp_path):
    from gft.errors import ConfigError
    data = rows_file(tmp_path / "train.jsonl", 4)
    with pytest.raises(ConfigError, match="neither a file nor a directory"):
        held_out(data, eval_data="test")


def test_an_eval_split_that_does_not_exist_is_an_error(tmp_path):
    """eval_split named on purpose but absent turned evaluation off, saying the data had
    no held-out split although it had one; the default (test) still falls back to valid."""
    from gft.errors import DataError as Error
    data = tmp_path / "data"
    data.mkdir()
    rows_file(data / "train.jsonl", 4)
    rows_file(data / "test.jsonl", 2, "h")
    with pytest.raises(Error, match=r"no 'tset' split"):
        held_out(data, eval_split="tset")
    (data / "test.jsonl").rename(data / "valid.jsonl")
    _, rows, note = held_out(data, eval_split="test")
    assert [r.prompt for r in rows] == ["h0", "h1"] and "'valid' split" in note
    (data / "valid.jsonl").rename(data / "test.jsonl")
    with pytest.raises(Error, match=r"no 'valid' split"):  # named, even as the fallback's name
        held_out(data, eval_split="valid")


def test_held_out_rows_that_training_also_asks_are_counted(tmp_path, model):
    """README: training rows are never evaluated on as if they were held out. With
    eval_split: train (or eval_data naming the training file, or a prompt duplicated
    across splits) they were, under 'N held-out rows' and nothing else."""
    data = tmp_path / "data"
    data.mkdir()
    rows_file(data / "train.jsonl", 4)
    (data / "test.jsonl").write_text(json.dumps({"prompt": "t1", "completion": "x"}) + "\n"
                                     + json.dumps({"prompt": "new", "completion": "x"}) + "\n")
    result, _ = train(model, data, tmp_path / "run", "torch", "preset=sft")
    assert ("warning: 1 of 2 held-out rows ask a prompt the training rows also ask (the "
            f"first: {data / 'test.jsonl'}:1); on those the evaluation is not held out") \
        in " ".join(result.output.split())
    result, _ = train(model, data, tmp_path / "run2", "torch", "preset=sft", "eval_split=train")
    assert "warning: 4 of 4 held-out rows ask a prompt" in " ".join(result.output.split())


def test_eval_data_written_as_a_missing_path_says_so(tmp_path):
    """It was looked up as a split name of the data directory: "no 'held/valid.jsonl'
    split: expected one of held/valid.jsonl.jsonl, ..."."""
    from gft.errors import ConfigError
    data = tmp_path / "data"
    data.mkdir()
    rows_file(data / "train.jsonl", 4)
    for missing in ("held/valid.jsonl", "valid.jsonl"):
        with pytest.raises(ConfigError, match=rf"^eval_data: no such file or directory: "
                                              rf"{re.escape(missing)}$"):
            held_out(data, eval_data=missing)


def test_an_evaluation_that_can_measure_nothing_says_so(tmp_path, model):
    """SFT without rewards on held-out rows without responses: the run announced 'N
    held-out rows' and logged only eval/n."""
    data = rows_file(tmp_path / "train.jsonl", 4)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"h{i}"}) + "\n" for i in range(2)))
    result, _ = train(model, data, tmp_path / "run", "torch", "preset=sft", f"eval_data={held}")
    assert "warning: evaluation measures nothing" in result.output
    result, _ = train(model, data, tmp_path / "run2", "torch", "preset=sft", f"eval_data={held}",
                      "rewards=[{name: regex, pattern: 'x'}]")
    assert "measures nothing" not in result.output


@pytest.mark.parametrize("trained", [None, True])
def test_a_runs_final_model_generates_as_it_was_trained(tmp_path, model, tokenizer, trained):
    """final/ holds no trainer_state.json, so `gft generate runs/x/final` (the README's
    example) wrapped plain prompts in the tokenizer's chat template although the run
    trained on them raw (chat_template unset, the default job's case)."""
    import shutil
    from gft.trained import generate_chat_template, trained_chat_template
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(model, run / "final")
    (run / "config.yaml").write_text(f"chat_template: {json.dumps(trained)}\n")
    assert tokenizer.chat_template  # a template the run did not use (when trained is None)
    assert generate_chat_template(str(run / "final"), tokenizer) is bool(trained)
    assert trained_chat_template(str(run / "final")) is bool(trained)
    assert trained_chat_template(str(model)) is None  # not a gft run's model
    assert generate_chat_template(str(model), tokenizer) is True


# TRL's documentation ("Logging extra columns / metrics from reward functions"): a reward
# logs a scalar with log_metric and a column of the completions table with log_extra.
LOGGING_REWARD = textwrap.dedent('''
    def logging_reward(completions, log_metric=None, log_extra=None, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        lengths = [len(t) for t in texts]
        if log_metric is not None:
            log_metric("avg_length", sum(lengths) / len(lengths))
        if log_extra is not None:
            log_extra("length", lengths)
        return [1.0 if t.strip() == "\\\\boxed{4}" else 0.0 for t in texts]
''')


@pytest.mark.parametrize("backend", backends())
def test_log_metric_and_log_extra_reach_metrics_samples_and_eval(tmp_path, model, backend):
    """TRL passes reward functions log_metric and log_extra; gft failed a function that
    named them and silently dropped what one taking **kwargs logged."""
    module = tmp_path / "logging_rewards.py"
    module.write_text(LOGGING_REWARD)
    rows = [{"prompt": f"Q{i}:", "completion": r" \boxed{4}", "answer": "4"} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    _, records = train(model, data, run, backend, f"rewards=[{module}:logging_reward]",
                       "num_offpolicy=1", "num_rollouts=2", "eval_samples=2",
                       "eval_holdout=0.3", "sample_every=1")
    step = next(r for r in records if r["step"] == 1)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    # the sample row (a rollout) shows its own length, not another response's
    (sample,) = samples
    assert sample["length"] == len(sample["completion"])
    # the step's mean over its 2 prompts × (1 dataset reply of 10 characters + 2 rollouts
    # of at most 6 one-byte tokens): between 20/6 and (20 + 4·6)/6
    assert 20 / 6 <= step["avg_length"] <= 44 / 6 and "eval/avg_length" in step
    assert records[0]["step"] == 0 and "eval/avg_length" in records[0]
