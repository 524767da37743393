"""Tests for gft.rewards: the built-ins, user rewards by import path, weighting and None
semantics, every validation error, and the accepted forms of the rewards config."""
from __future__ import annotations

import sys
import threading
from fractions import Fraction

import numpy as np
import pytest

from gft.errors import ConfigError, RewardError
from gft.rewards import (BUILTIN_REWARDS, RewardModel, RewardSpec, build_rewards,
                         parse_reward_specs, resolve_reward)


def score(rewards, completions, answers, sources=None, **columns):
    model = rewards if isinstance(rewards, RewardModel) else build_rewards(rewards)
    prompts = ["p"] * len(completions)
    return model.score(prompts, completions, {"answer": answers, **columns}, sources)


# ---------------------------------------------------------------------------------------
# Built-ins


@pytest.mark.parametrize("completion, answer, expected", [
    (r"so \boxed{0.5}", "1/2", 1.0),
    ("The answer is 42", "42", 1.0),
    ("The answer is 41", "42", 0.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"$\frac{2}{4}$", "0.5", 1.0),
    (r"we get \boxed{2\sqrt{3}}", r"2\sqrt{3}", 1.0),
    ("it is 2", r"2\sqrt{3}", 0.0),  # a bare parse of the gold would read "2"
    (r"\boxed{x^2+1}", "x^2+1", 1.0),
    ("no number at all", "7", 0.0),
    (r"\boxed{7}", "$7$", 1.0),  # gold already delimited
    # MATH writes currency as "\$18.90": an escaped $ is not a delimiter (the gold parsed
    # to nothing, so the reward did not apply to the row)
    (r"\boxed{18.90}", r"\$18.90", 1.0),
    (r"\boxed{\$18.90}", r"\$18.90", 1.0),
    (r"\boxed{18.91}", r"\$18.90", 0.0),
    # scientific notation is a number, not 1.5·e − 5 (Python prints 0.000015 as 1.5e-05)
    (r"\boxed{0.000015}", "1.5e-05", 1.0),
    (r"\boxed{1.5e-05}", "0.000015", 1.0),
    (r"\boxed{1.5e-05}", "1.5e-05", 1.0),
    (r"\boxed{0.00002}", "1.5e-05", 0.0),
    (r"the answer is 1e5.", "100000", 1.0),
])
def test_math(completion, answer, expected):
    assert score("math", [completion], [answer]).total.tolist() == [expected]


def test_math_works_outside_the_main_thread():
    # math_verify's SIGALRM timeouts fail off the main thread; the reward turns them off.
    results = []
    thread = threading.Thread(target=lambda: results.append(
        score("math", [r"\boxed{0.5}", "3"], ["1/2", "4"]).total.tolist()))
    thread.start()
    thread.join()
    assert results == [[1.0, 0.0]]


def test_math_unparseable_gold_is_not_applicable():
    result = score("math", ["1", "2"], ["", "2"])
    assert result.total.tolist() == [0.0, 1.0] and result.n_none == 1
    assert np.isnan(result.per_function["math"][0])


@pytest.mark.parametrize("name", ["math", "exact"])
def test_missing_answer_names_reward_source_and_column(name):
    with pytest.raises(RewardError) as excinfo:
        score(name, ["1", "2"], ["1", None], sources=["d.jsonl:1", "d.jsonl:7"])
    message = str(excinfo.value)
    assert f"'{name}'" in message and "d.jsonl:7" in message and "'answer'" in message


def test_missing_answer_column_entirely():
    model = build_rewards("exact")
    with pytest.raises(RewardError, match="row 0: column 'answer' is missing"):
        model.score(["p"], ["1"], {})


def test_exact():
    result = score("exact", [" 42\n", "42.0", "forty-two"], ["42", "42", "forty-two "])
    assert result.total.tolist() == [1.0, 0.0, 1.0]


def test_regex_format_only():
    result = score([{"name": "regex", "pattern": r"<answer>.*</answer>"}],
                   ["<answer>3</answer>", "3"], [None, None])
    assert result.total.tolist() == [1.0, 0.0]


def test_regex_with_answer_group():
    rewards = [{"name": "regex", "pattern": r"Answer:\s*(?P<answer>\S+)|nothing"}]
    result = score(rewards, ["Answer: 12", "Answer: 13", "no match", "nothing here"],
                   ["12", "12", "12", " 12 "])
    # the last matches the other branch: the answer group captured nothing, so 0.0
    assert result.total.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("options, words", [
    ({}, "missing option(s) pattern"),
    ({"pattern": "("}, "bad pattern"),
    ({"pattern": 3}, "must be a string"),
    ({"pattern": "x", "flags": "i"}, "unknown option(s) flags"),
])
def test_regex_option_errors(options, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_rewards([{"name": "regex", **options}])


def test_builtins_registered():
    assert set(BUILTIN_REWARDS) == {"math", "exact", "regex"}
    assert callable(resolve_reward(RewardSpec("exact")))


# ---------------------------------------------------------------------------------------
# User rewards by import path

USER_MODULE = '''
def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def level_only(prompts, completions, level):
    # no **kwargs: only the columns it names are passed
    return [float(x) for x in level]

def scaled(prompts, completions, scale, **columns):
    return [scale * len(c) for c in completions]

def sometimes(prompts, completions, **columns):
    return [None if c == "skip" else 1.0 for c in completions]

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_rewards.py"


def test_user_reward_by_module_path(user_module):
    assert score("my_rewards:length", ["ab", "abcd"], [None, None]).total.tolist() \
        == [2.0, 4.0]


def test_user_reward_by_file_path(user_module):
    result = score(f"{user_module}:length", ["abc"], [None])
    assert result.total.tolist() == [3.0]


def test_user_reward_gets_only_named_columns(user_module):
    result = score("my_rewards:level_only", ["a", "b"], [None, None], level=[1, 2],
                   other=["x", "y"])
    assert result.total.tolist() == [1.0, 2.0]


def test_user_reward_options_become_keywords(user_module):
    rewards = [{"name": "my_rewards:scaled", "scale": 0.5}]
    # an option wins over a data column of the same name
    assert score(rewards, ["abcd"], [None], scale=[100]).total.tolist() == [2.0]


@pytest.mark.parametrize("option", ["completions", "prompts", "trainer_state"])
def test_an_option_named_like_a_batch_argument_is_refused(user_module, option):
    """Bound as an option it replaced the batch's completions on every call: every
    completion was scored as the option's value."""
    with pytest.raises(ConfigError) as excinfo:
        build_rewards([{"name": "my_rewards:scaled", option: ["x"]}])
    assert f"option '{option}'" in str(excinfo.value) and "rename" in str(excinfo.value)


def test_a_module_in_the_working_directory_imports_under_the_gft_command(tmp_path,
                                                                        monkeypatch):
    """The installed `gft` script's sys.path holds its bin directory, not the working
    directory (python -m gft's does): 'cwd_rewards_xyz:f' next to the data failed with
    ModuleNotFoundError under one and worked under the other."""
    (tmp_path / "cwd_rewards_xyz.py").write_text(
        "def f(completions, **kwargs):\n    return [0.5 for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwd_rewards_xyz", raising=False)
    assert score(["cwd_rewards_xyz:f"], ["a"], [None]).total.tolist() == [0.5]
    assert sys.path[-1] == str(tmp_path.resolve())  # last: it shadows nothing


def test_a_reward_file_imports_modules_beside_it(tmp_path, monkeypatch):
    """`from helpers import x` in path/to/my_rewards.py, as `python my_rewards.py` runs
    it: ModuleNotFoundError unless the working directory was that file's directory."""
    folder = tmp_path / "rewards_dir"
    folder.mkdir()
    (folder / "helpers_beside_xyz.py").write_text("def half(c):\n    return 0.5\n")
    (folder / "scored.py").write_text(
        "from helpers_beside_xyz import half\n"
        "def f(completions, **kwargs):\n    return [half(c) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "helpers_beside_xyz", raising=False)
    assert score([f"{folder / 'scored.py'}:f"], ["a"], [None]).total.tolist() == [0.5]


@pytest.mark.parametrize("name, words", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:NOT_CALLABLE", "not callable"),
    ("broken_rewards:f", "RuntimeError: boom at import"),
    ("nowhere/rewards.py:f", "file not found"),
    ("not_a_builtin", "unknown reward 'not_a_builtin'"),
    # `--set rewards=math,exact` is one string; it read as one unknown name
    ("math,exact", "several rewards are a list: [math, exact]"),
    ("math, exact regex", "several rewards are a list: [math, exact, regex]"),
])
def test_user_reward_resolution_errors(user_module, name, words):
    with pytest.raises(RewardError) as excinfo:
        build_rewards(name)
    assert words in str(excinfo.value) and name.split(":")[0] in str(excinfo.value)


# ---------------------------------------------------------------------------------------
# Combining: weights, None, accuracy


def test_weights_sum_and_correct_uses_first(user_module):
    rewards = [{"name": "exact", "weight": 2.0}, {"name": "my_rewards:length", "weight": -0.5}]
    result = score(rewards, ["7", "77"], ["7", "7"])
    assert result.total.tolist() == [2.0 - 0.5, 0.0 - 1.0]
    assert result.correct.tolist() == [True, False]
    assert result.per_function["exact"].tolist() == [1.0, 0.0]
    assert result.per_function["my_rewards:length"].tolist() == [1.0, 2.0]
    assert result.n_none == 0


def test_none_contributes_nothing(user_module):
    rewards = {"my_rewards:sometimes": 1.0, "exact": 3.0}
    result = score(rewards, ["skip", "x"], ["no", "x"])
    # sample 0: sometimes=None, exact=0 -> 0.0 (not all None); sample 1: 1 + 3
    assert result.total.tolist() == [0.0, 4.0] and result.n_none == 0
    assert np.isnan(result.per_function["my_rewards:sometimes"][0])
    assert result.correct.tolist() == [False, True]  # None is not correct


def test_all_none_counts_in_n_none(user_module):
    result = score("my_rewards:sometimes", ["skip", "skip", "ok"], [None] * 3)
    assert result.total.tolist() == [0.0, 0.0, 1.0] and result.n_none == 2


def test_duplicate_names_are_kept_apart():
    rewards = [{"name": "regex", "pattern": "a"}, {"name": "regex", "pattern": "b"}]
    result = score(rewards, ["a", "ab"], [None, None])
    assert set(result.per_function) == {"regex", "regex#2"}
    assert result.total.tolist() == [1.0, 2.0]


def test_numpy_and_bool_values_accepted():
    def as_array(prompts, completions, **columns):
        return np.array([c == "y" for c in completions])
    model = RewardModel([RewardSpec("exact")])
    model.functions, model.names = [as_array], ["as_array"]
    assert score(model, ["y", "n"], [None, None]).total.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("make", [
    lambda torch, n: torch.ones(n),                        # a 1-D tensor
    lambda torch, n: [torch.tensor(1.0) for _ in range(n)],  # a list of 0-d tensors
    lambda torch, n: [np.array(1.0)] * n,                   # a list of 0-d arrays
    lambda torch, n: [Fraction(1, 1)] * n,
])
def test_tensor_values_accepted_as_trl_accepts_them(make):
    """TRL makes a tensor of whatever a reward returns, so a function returning a torch
    tensor (or a list of 0-d ones) runs there; here it was 'returned Tensor'."""
    torch = pytest.importorskip("torch")
    model = model_with(lambda completions, **kwargs: make(torch, len(completions)))
    assert score(model, ["a", "b"], [None, None]).total.tolist() == [1.0, 1.0]


def test_a_function_signature_is_read_once(monkeypatch):
    """inspect.signature ran twice per function on every batch; it is read once, and
    again only for a function put in its place."""
    import inspect

    def first(completions, answer):
        return [1.0] * len(completions)

    def second(completions, **kwargs):
        return [2.0] * len(completions)
    model = model_with(first)
    calls, real = [], inspect.signature
    monkeypatch.setattr(inspect, "signature",
                        lambda f, *a, **k: calls.append(f) or real(f, *a, **k))
    for _ in range(3):
        assert score(model, ["a", "b"], [None, None]).total.tolist() == [1.0, 1.0]
    assert calls == [first]
    model.functions = [second]
    for _ in range(2):
        assert score(model, ["a"], [None]).total.tolist() == [2.0]
    assert calls == [first, second]


# ---------------------------------------------------------------------------------------
# A misbehaving reward function: each error names it


def model_with(function) -> RewardModel:
    model = RewardModel([RewardSpec("exact")])
    model.functions, model.names = [function], ["bad_reward"]
    return model


def raises(prompts, completions, **columns):
    raise KeyError("solution")


@pytest.mark.parametrize("function, words", [
    (raises, ["raised KeyError", "solution"]),
    (lambda completions, **k: 1.0, ["returned float", "expected a list of 2"]),
    (lambda completions, **k: (x for x in completions), ["returned generator"]),
    (lambda completions, **k: [1.0], ["returned 1 values", "expected 2"]),
    (lambda completions, **k: [1.0, float("nan")], ["nan", "d.jsonl:2", "finite"]),
    (lambda completions, **k: [float("inf"), 1.0], ["inf", "d.jsonl:1"]),
    (lambda completions, **k: [1.0, np.nan], ["nan", "return None where a reward does not"]),
    # float() of an int past 1.8e308 raised OverflowError (a traceback)
    (lambda completions, **k: [1, -10 ** 400], ["-inf", "d.jsonl:2", "finite"]),
    (lambda completions, **k: [Fraction(10 ** 400), 1], ["inf", "d.jsonl:1", "finite"]),
    (lambda completions, **k: [1.0, "1.0"], ["returned str", "d.jsonl:2", "float or None"]),
    (lambda completions, **k: [[1.0], 1.0], ["returned list", "d.jsonl:1"]),
])
def test_bad_reward_function(function, words):
    with pytest.raises(RewardError) as excinfo:
        score(model_with(function), ["a", "b"], [None, None],
              sources=["d.jsonl:1", "d.jsonl:2"])
    message = str(excinfo.value)
    assert "'bad_reward'" in message and "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_misaligned_inputs():
    model = build_rewards("exact")
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2"):
        model.score(["p", "p"], ["a", "b"], {"answer": ["a"]})
    with pytest.raises(RewardError, match="prompts has 1 values"):
        model.score(["p"], ["a", "b"], {"answer": ["a", "b"]})
    with pytest.raises(RewardError, match="completion 1 is NoneType"):
        model.score(["p", "p"], ["a", None], {"answer": ["a", "b"]})


# ---------------------------------------------------------------------------------------
# Config forms


@pytest.mark.parametrize("raw, expected", [
    ("math", [RewardSpec("math")]),
    (["math", "exact"], [RewardSpec("math"), RewardSpec("exact")]),
    ([{"name": "regex", "weight": 0.5, "pattern": "x"}],
     [RewardSpec("regex", 0.5, {"pattern": "x"})]),
    ({"math": 1, "exact": 0.25}, [RewardSpec("math", 1.0), RewardSpec("exact", 0.25)]),
    ({"name": "exact", "weight": 2}, [RewardSpec("exact", 2.0)]),
    (["m.py:f", {"name": "exact"}], [RewardSpec("m.py:f"), RewardSpec("exact")]),
])
def test_parse_reward_specs(raw, expected):
    assert parse_reward_specs(raw) == expected


@pytest.mark.parametrize("raw, words", [
    (None, "got NoneType"),
    (3, "got int"),
    ([], "empty"),
    ({}, "empty"),
    ("", "non-empty string"),
    ([3], "rewards[0]"),
    ([{"weight": 1}], "without 'name'"),
    ([{"name": "math", "weight": "high"}], "weight of 'math'"),
    ({"math": True}, "weight of 'math'"),
    ({"math": float("nan")}, "finite"),
    ({"math": None}, "weight of 'math'"),
])
def test_parse_reward_specs_errors(raw, words):
    with pytest.raises(ConfigError) as excinfo:
        parse_reward_specs(raw)
    assert words in str(excinfo.value)


# ---------------------------------------------------------------------------------------
# TRL's log_metric / log_extra callbacks

LOGGING_MODULE = '''
import numpy as np

def logs(completions, log_metric=None, log_extra=None, **kwargs):
    # TRL's documented use: a scalar per call, a column per completion
    lengths = [len(c) for c in completions]
    log_metric("mean_len", float(np.mean(lengths)))
    log_extra("length", np.array(lengths))  # NumPy values, as a reward may hand them
    return [1.0] * len(completions)

def also_logs(completions, **kwargs):
    kwargs["log_metric"]("mean_len", 10.0)  # the same name from a second function
    return [0.0] * len(completions)

def bad_metric(completions, log_metric, **kwargs):
    log_metric("score", "high")
    return [0.0] * len(completions)

def short_column(completions, log_extra, **kwargs):
    log_extra("why", ["ok"])
    return [0.0] * len(completions)

def replaces_reward(completions, log_extra, **kwargs):
    log_extra("reward", [0.0] * len(completions))
    return [0.0] * len(completions)
'''


@pytest.fixture
def logging_module(tmp_path, monkeypatch):
    (tmp_path / "logging_rewards.py").write_text(LOGGING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_log_metric_and_log_extra_reach_the_result(logging_module):
    result = score(["logging_rewards:logs", "logging_rewards:also_logs"],
                   ["ab", "abcd"], [None, None])
    # every value under its name (the step's mean is taken over all of them: (3 + 10) / 2)
    assert result.logged == {"mean_len": [3.0, 10.0]}
    assert result.extra == {"length": [2, 4]}
    assert all(type(v) is int for v in result.extra["length"])  # plain, for JSON


@pytest.mark.parametrize("name, words", [
    ("bad_metric", "reward 'logging_rewards:bad_metric': log_metric('score', 'high'): "
                   "expected a finite number"),
    ("short_column", "reward 'logging_rewards:short_column': log_extra('why') got 1 values; "
                     "expected 2 (one per completion)"),
    ("replaces_reward", "reward 'logging_rewards:replaces_reward': log_extra column 'reward'"),
])
def test_log_callbacks_refuse_what_they_cannot_log(logging_module, name, words):
    with pytest.raises(RewardError) as info:
        score(f"logging_rewards:{name}", ["ab", "abcd"], [None, None])
    assert str(info.value).startswith(words)


def test_a_metric_named_like_one_of_gfts_is_refused():
    from gft.rewardlog import add_logged
    metrics = {"loss": 1.0}
    add_logged(metrics, {"mean_len": 3.0})
    assert metrics == {"loss": 1.0, "mean_len": 3.0}
    with pytest.raises(RewardError, match="'loss' is one of gft's own metrics"):
        add_logged(metrics, {"loss": 2.0})


@pytest.mark.parametrize("name", ["loss", "loss/kl", "train/loss", "train/global_step",
                                  "reward", "reward_std", "eval/x", "completions/x", "lr/x"])
def test_a_metric_in_a_namespace_gft_logs_is_refused_in_every_step(name):
    """A log_metric name gft (or TRL, or a tracker's train/) uses replaced gft's figure on
    a dashboard ('train/loss'), broke MLflow's file store ('loss/kl' beside 'loss'), or
    was refused only in steps that happened to log the clashing key ('reward': rollout
    steps only): checked against a fixed set, it is refused whenever it is logged."""
    from gft.rewardlog import LogCallbackError, RewardLog
    log_metric = RewardLog(2).callbacks("f")["log_metric"]
    with pytest.raises(LogCallbackError, match=rf"reward 'f': log_metric name '{name}' is in "
                                               "a namespace gft logs itself"):
        log_metric(name, 1.0)
    log_metric("my/" + name, 1.0)  # the suggested name is taken
