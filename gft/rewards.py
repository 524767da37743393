"""Verifiable rewards: built-in scorers, user callables, and their weighted sum.

A reward function follows TRL's GRPOTrainer calling convention, by keyword:
    f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)
- prompts: one per completion; the row's prompt as written, i.e. a string, or for
  conversational data the full list of chat messages (system turn included);
- completions: a string each, or for conversational data [{"role": "assistant",
  "content": text}] (TRL's form, so `completion[0]["content"]` works);
- completion_ids: the response's token ids (a rollout ends with its stop token, a
  dataset response with the EOS it is trained on);
- trainer_state: a `TrainerState` (global_step, epoch, max_steps);
- log_metric(name, value) and log_extra(column, values): TRL's callbacks; a scalar
  (averaged over the step, logged beside gft's metrics) and a column of the step's
  sample completions table (one value per completion);
- every other data column by name, aligned with the completions (`answer` always).
A function receives only the arguments it names unless it takes **kwargs, and returns
one float per completion, or None where the reward does not apply. `async def`
functions are awaited, all of a batch's together (as TRL does).

`RewardModel.score` runs every configured function, checks what it returned (the right
number of finite numbers or None) and combines them:
    total_i  = sum_f weight_f * r_f,i      over the functions f with r_f,i not None
    correct_i = (r_first,i >= 1.0)         the first function doubles as "accuracy"
A sample for which every function returns None gets total 0.0 and is counted in `n_none`.
Every failure is a one-line `RewardError` (or `ConfigError` for a bad spec) naming the
reward function, and where it concerns one sample, that sample's source. The built-in
rewards (math, exact, regex) are in gft/verifiers.py.
"""
from __future__ import annotations

import asyncio
import fractions
import functools
import importlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from gft.timeouts import CallTimeout, call_with_timeout
from gft.rewardlog import LogCallbackError, RewardLog
from gft.errors import ConfigError, RewardError
from gft.rewardmodel import names_a_reward_model
from gft.runpaths import is_file_location, looks_local
from gft.verifiers import BUILTIN_REWARDS, MissingColumnError, RewardFunction


@dataclass(frozen=True)
class TrainerState:
    """What TRL passes as `trainer_state`: the optimizer step reached and the (fractional)
    epoch, so that a reward can change with training progress."""
    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0


Prompt = Any  # a string, or a list of {"role", "content"} messages


# ---------------------------------------------------------------------------------------
# Specs: what the config asks for


@dataclass
class RewardSpec:
    """One reward in the config: a built-in name or "module:function" /
    "path/to/file.py:function", its weight in the total, and its options."""
    name: str
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


def parse_reward_specs(raw: Any) -> list[RewardSpec]:
    """Read the config's `rewards` value: "math", ["math", "exact"],
    [{"name": "regex", "weight": 0.5, "pattern": "..."}], or {"math": 1.0, "exact": 0.5}."""
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, dict) and isinstance(raw.get("name"), str):
        raw = [raw]  # one spec written as a mapping, not a {name: weight} table
    if isinstance(raw, dict):
        specs = [RewardSpec(_spec_name(name), _spec_weight(weight, name))
                 for name, weight in raw.items()]
    elif isinstance(raw, (list, tuple)):
        specs = [_spec_from_item(item, index) for index, item in enumerate(raw)]
    else:
        raise ConfigError("rewards: expected a name, a list of names or mappings, or a "
                          f"{{name: weight}} mapping, got {type(raw).__name__}")
    if not specs:
        raise ConfigError("rewards: empty; name at least one reward (e.g. \"math\")")
    return specs


def _spec_from_item(item: Any, index: int) -> RewardSpec:
    """One list entry: a name, or {"name": ..., "weight": ..., **options}."""
    if isinstance(item, str):
        return RewardSpec(_spec_name(item))
    if not isinstance(item, dict):
        raise ConfigError(f"rewards[{index}]: expected a name or a mapping with 'name', "
                          f"got {type(item).__name__}")
    if "name" not in item:
        raise ConfigError(f"rewards[{index}]: mapping without 'name'")
    options = {key: value for key, value in item.items() if key not in ("name", "weight")}
    name = _spec_name(item["name"])
    return RewardSpec(name, _spec_weight(item.get("weight", 1.0), name), options)


def _spec_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"rewards: a reward name must be a non-empty string, got {name!r}")
    return name.strip()


def _spec_weight(weight: Any, name: str) -> float:
    # bool is an int subclass; `math: true` is almost certainly a mistake for a weight.
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight):
        raise ConfigError(f"rewards: weight of '{name}' must be a finite number, "
                          f"got {weight!r}")
    return float(weight)


# ---------------------------------------------------------------------------------------
# Resolving names to callables


def resolve_reward(spec: RewardSpec) -> RewardFunction:
    """The callable for a spec: a built-in made with its options, or a user function
    (options are then passed to it as keyword arguments on every call)."""
    if spec.name in BUILTIN_REWARDS:
        factory = BUILTIN_REWARDS[spec.name]
        _check_options(spec, factory)
        return factory(**spec.options)
    if names_a_reward_model(spec.name):  # TRL's reward_funcs="org/reward-model"
        from gft.rewardmodel import load_reward_model
        _check_options(spec, load_reward_model, fixed=("name",))
        return load_reward_model(spec.name, **spec.options)
    if ":" not in spec.name and looks_local(spec.name) and not Path(spec.name).exists():
        raise RewardError(f"reward '{spec.name}': no such folder (a reward model is a "
                          "folder with config.json, or a Hub id org/name)")
    if ":" not in spec.name:
        several = [part for part in spec.name.replace(",", " ").split() if part]
        raise RewardError(f"unknown reward '{spec.name}': built-ins are "
                          + ", ".join(sorted(BUILTIN_REWARDS))
                          + "; user rewards are 'package.module:function' or "
                            "'path/to/file.py:function'; a reward model is a folder or a "
                            "Hub id 'org/name'"
                          + (f"; several rewards are a list: [{', '.join(several)}]"
                             if len(several) > 1 else ""))
    shadowed = sorted(set(spec.options) & set(_RESERVED))
    if shadowed:  # bound as an option, it would replace the batch's own on every call
        raise ConfigError(f"reward '{spec.name}': option '{shadowed[0]}' is the name the "
                          f"function receives the batch's {shadowed[0]} under; rename the "
                          "option")
    function = _import_function(spec.name)
    return functools.partial(function, **spec.options) if spec.options else function


def _check_options(spec: RewardSpec, factory: Callable[..., RewardFunction],
                   fixed: tuple[str, ...] = ()) -> None:
    """Unknown or missing options of a built-in (or a reward model: `fixed` are the
    factory's parameters the spec itself supplies), as a ConfigError naming them."""
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items()
                  if name not in fixed}
    unknown = sorted(set(spec.options) - set(parameters))
    missing = [name for name, p in parameters.items()
               if p.default is p.empty and name not in spec.options]
    if unknown or missing:
        raise ConfigError(f"reward '{spec.name}': "
                          + (f"unknown option(s) {', '.join(unknown)}; " if unknown else "")
                          + (f"missing option(s) {', '.join(missing)}; " if missing else "")
                          + f"it takes: {', '.join(parameters) or 'no options'}")


def _import_function(target: str) -> Callable:
    """Import "package.module:function" or "path/to/file.py:function"."""
    location, _, attribute = target.rpartition(":")
    try:
        if is_file_location(location):
            module = _import_file(Path(location))
        else:
            module = _import_module(location)
    except RewardError:
        raise
    except Exception as exc:  # ImportError, SyntaxError, or anything the module raises
        raise RewardError(f"reward '{target}': cannot import '{location}': "
                          f"{type(exc).__name__}: {exc}") from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise RewardError(f"reward '{target}': module '{location}' has no attribute "
                          f"'{attribute}'")
    if not callable(function):
        raise RewardError(f"reward '{target}': '{attribute}' is not callable")
    return function


def _import_module(name: str) -> Any:
    """Import a module as `python -m gft` would find it: the installed `gft` command's
    sys.path starts with its own bin directory instead of the working directory, so
    'my_rewards:f' next to the user's data was found by one and not the other."""
    _on_path(Path.cwd())
    return importlib.import_module(name)


def _on_path(directory: Path) -> None:
    """Let user reward code import what lies beside it, as `python my_rewards.py` could.
    Appended, never first: a module of the same name elsewhere (the standard library,
    gft) still wins. Kept for the run: a function may import lazily, at call time."""
    directory = str(directory.resolve())
    if directory not in sys.path and (directory != str(Path.cwd()) or "" not in sys.path):
        sys.path.append(directory)


def _import_file(path: Path) -> Any:
    """Execute a Python file as a module (registered so pickling and imports work)."""
    if not path.is_file():
        raise RewardError(f"reward file not found: {path}")
    _on_path(path.parent)  # `from helpers import x` beside the reward file
    module_name = f"gft_user_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


# ---------------------------------------------------------------------------------------
# Scoring


@dataclass
class RewardResult:
    """Scores for N completions (shapes [N]).

    total:        weighted sum of the applicable rewards (0.0 where none applies).
    per_function: each reward's raw values, NaN where it returned None.
    correct:      the first reward's value >= 1.0 (used as accuracy).
    n_none:       how many samples no reward applied to.
    logged:       what the functions passed to log_metric, every value by name.
    extra:        what they passed to log_extra: a column of N values by name.
    """
    total: np.ndarray
    per_function: dict[str, np.ndarray]
    correct: np.ndarray
    n_none: int
    logged: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[Any]] = field(default_factory=dict)


class RewardModel:
    """The configured reward functions, called together on a batch of completions."""

    def __init__(self, specs: Sequence[RewardSpec], timeout: float = 0.0):
        self.timeout = timeout  # seconds per call (reward_timeout), 0 = none
        if not specs:
            raise ConfigError("rewards: empty; name at least one reward")
        self.names = _unique_names([spec.name for spec in specs])
        self.weights = np.array([spec.weight for spec in specs], dtype=np.float64)
        self.functions = [resolve_reward(spec) for spec in specs]
        # id(function) -> (function, its _Parameters): a function's signature never
        # changes, so it is read once, not twice per function on every batch
        self._parameters: dict[int, tuple[Callable, _Parameters]] = {}

    @property
    def log_names(self) -> list[str]:
        """Short names for metrics: a user reward 'file.py:reward_len' logs as reward_len,
        a reward model 'org/RM-Gemma-2B' (or a folder) by its last part, as in TRL."""
        return _unique_names([_short_name(name.split("#")[0]) for name in self.names])

    def score(self, prompts: list[Prompt], completions: list[str], columns: dict[str, list],
              sources: list[str] | None = None, *,
              completion_ids: list[list[int]] | None = None,
              trainer_state: TrainerState | None = None) -> RewardResult:
        """Call every reward on the batch (TRL's keywords) and combine the checked results.

        prompts: each row's prompt as written (string or chat messages); completions:
        decoded text, handed to the functions as TRL's message form where the prompt
        is a chat."""
        columns = _check_batch(prompts, completions, columns, sources)
        arguments = {
            "prompts": list(prompts),
            "completions": [[{"role": "assistant", "content": text}]
                            if isinstance(prompt, list) else text
                            for prompt, text in zip(prompts, completions)],
            "completion_ids": [list(ids) for ids in completion_ids]
            if completion_ids is not None else [[] for _ in completions],
            "trainer_state": trainer_state or TrainerState(),
            **{key: list(values) for key, values in columns.items()
               if key not in _RESERVED},
        }
        log = RewardLog(len(completions))
        returned = [self._call(name, function, {**arguments, **log.callbacks(name)}, sources)
                    for name, function in zip(self.names, self.functions)]
        returned = _await_all(returned, self.names, self.timeout, sources)
        values = np.stack([_check_values(name, value, len(completions), sources)
                           for name, value in zip(self.names, returned)])  # [F, N]
        applicable = ~np.isnan(values)
        total = np.where(applicable, values * self.weights[:, None], 0.0).sum(axis=0)
        return RewardResult(
            total=total,
            per_function=dict(zip(self.names, values)),
            correct=values[0] >= 1.0,  # NaN (None) compares False: not correct
            n_none=int((~applicable.any(axis=0)).sum()),
            logged=log.metrics, extra=log.columns)

    def _call(self, name: str, function: RewardFunction, arguments: dict[str, Any],
              sources: list[str] | None) -> Any:
        """One reward's raw return value (a coroutine for an async function); every
        failure named."""
        parameters = self._parameters_of(function)
        kwargs = _accepted_arguments(parameters, arguments)
        _check_required(name, parameters, kwargs, arguments)
        try:
            return call_with_timeout(lambda: function(**kwargs), self.timeout)
        except CallTimeout:
            raise RewardError(_timeout_message(name, self.timeout, sources)) from None
        except LogCallbackError:  # already names the reward
            raise
        except Exception as exc:
            raise _named_error(name, exc, sources, function) from exc

    def _parameters_of(self, function: RewardFunction) -> _Parameters:
        """The function's parameters, read once (the cache holds the function itself, so
        a function put in `functions` later is never taken for one with its id)."""
        cached = self._parameters.get(id(function))
        if cached is None or cached[0] is not function:
            cached = self._parameters[id(function)] = (function, _read_parameters(function))
        return cached[1]


# The names TRL's trainer passes besides the data columns; a column by one of these
# names would be shadowed, so rows may not use them (gft/data.py refuses them).
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric",
             "log_extra")


def _named_error(name: str, exc: Exception, sources: list[str] | None,
                 function: Callable | None = None) -> RewardError:
    """A reward function's failure as one line naming it (and the row, when known)."""
    if isinstance(exc, MissingColumnError):
        where = _source(sources, exc.index)
        return RewardError(f"reward '{name}': {where}: column '{exc.column}' is missing "
                           "(None); this reward needs it on every row")
    message = " ".join(str(exc).split())  # one line, whatever the function raised
    return RewardError(f"reward '{name}' raised {type(exc).__name__}"
                       f"{_raised_at(exc, function)}: {message}")


def _raised_at(exc: BaseException, function: Callable | None) -> str:
    """' at file:line' of the code that raised: the innermost traceback frame in the
    reward function's own file, else the innermost frame outside gft. The error shows no
    traceback, and 'TypeError: ...' alone does not say which line to fix."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    try:
        own_file = inspect.getsourcefile(inspect.unwrap(
            function.func if isinstance(function, functools.partial) else function))
    except TypeError:  # a builtin, or None
        own_file = None
    gft_dir = str(Path(__file__).parent)
    candidates = [f for f in frames if f[0] == own_file] or \
        [f for f in frames if not f[0].startswith(gft_dir)]
    return f" at {candidates[-1][0]}:{candidates[-1][1]}" if candidates else ""


def _await_all(returned: list[Any], names: list[str], timeout: float,
               sources: list[str] | None) -> list[Any]:
    """Await the coroutines of async reward functions, concurrently (an LLM judge or a
    sandbox call then overlap), on a private event loop: run in a worker thread when the
    caller already runs one (a notebook), since asyncio.run refuses to nest. Each one
    may take `timeout` seconds (reward_timeout; 0 = no limit)."""
    pending = [i for i, value in enumerate(returned) if inspect.isawaitable(value)]
    if not pending:
        return returned

    async def named(index: int) -> Any:
        try:
            return await asyncio.wait_for(returned[index], timeout if timeout > 0 else None)
        except asyncio.TimeoutError:
            raise RewardError(_timeout_message(names[index], timeout, sources)) from None
        except LogCallbackError:  # already names the reward
            raise
        except Exception as exc:
            raise _named_error(names[index], exc, None) from exc

    async def gather() -> list[Any]:
        return await asyncio.gather(*(named(i) for i in pending))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        results = asyncio.run(gather())
    else:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            results = pool.submit(asyncio.run, gather()).result()
    out = list(returned)
    for index, value in zip(pending, results):
        out[index] = value
    return out


def build_rewards(raw: Any, timeout: float = 0.0) -> RewardModel:
    """Config value -> ready RewardModel (parse_reward_specs, then resolve); `timeout`:
    seconds one call of a function may take (gft/timeouts.py), 0 = no limit."""
    return RewardModel(parse_reward_specs(raw), timeout)


def _timeout_message(name: str, seconds: float, sources: list[str] | None) -> str:
    unique = list(dict.fromkeys(sources or []))  # a row's G responses share its source
    rows = ", ".join(unique[:3]) + (", ..." if len(unique) > 3 else "")
    return (f"reward '{name}' did not return within reward_timeout={seconds:g} s on a batch "
            f"of {len(sources or [])} responses (rows: {rows or '?'}); fix the function, or "
            "raise reward_timeout (0 = no limit)")


def _short_name(name: str) -> str:
    if ":" in name:
        return name.rpartition(":")[2]
    return name.rstrip("/\\").replace("\\", "/").rpartition("/")[2] or name


def _unique_names(names: list[str]) -> list[str]:
    """Two rewards may share a name (e.g. two regexes): suffix "#2", "#3" to keep both."""
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return unique


def _check_batch(prompts: list[Prompt], completions: list[str], columns: dict[str, list],
                 sources: list[str] | None) -> dict[str, list]:
    """Aligned inputs; `answer` always present so that rewards can rely on it."""
    n = len(completions)
    for label, values in [("prompts", prompts), ("sources", sources),
                          *((f"column '{k}'", v) for k, v in columns.items())]:
        if values is not None and len(values) != n:
            raise RewardError(f"rewards: {label} has {len(values)} values for "
                              f"{n} completions")
    for index, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise RewardError(f"rewards: completion {index} is "
                              f"{type(completion).__name__}, not a string")
    return {"answer": [None] * n, **columns}


@dataclass(frozen=True)
class _Parameters:
    """What a reward function's signature says about the arguments it takes.
    names: None when it has no signature (some builtins and C callables): it gets all."""
    names: frozenset[str] | None
    takes_all: bool             # **kwargs
    required: tuple[str, ...]   # keyword-passable parameters without a default
    bound: frozenset[str]       # options bound with functools.partial


def _read_parameters(function: Callable) -> _Parameters:
    bound = frozenset(function.keywords) if isinstance(function, functools.partial) \
        else frozenset()
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return _Parameters(None, True, (), bound)
    return _Parameters(
        names=frozenset(p.name for p in parameters),
        takes_all=any(p.kind is p.VAR_KEYWORD for p in parameters),
        required=tuple(p.name for p in parameters if p.default is p.empty
                       and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)),
        bound=bound)


def _accepted_arguments(parameters: _Parameters, arguments: dict[str, Any]
                        ) -> dict[str, Any]:
    """All arguments for functions taking **kwargs (TRL's own trainer passes them all);
    otherwise only the ones they name, so that `def f(completions, answer)` works
    without a **kwargs catch-all."""
    if parameters.names is None:
        return arguments
    # Options bound with functools.partial must win over a column of the same name.
    return {key: value for key, value in arguments.items()
            if key not in parameters.bound
            and (parameters.takes_all or key in parameters.names)}


# What TRL's trainer passes that gft does not (README: Rewards).
_TRL_ONLY = {"environments": "TRL's environment instances"}


def _check_required(name: str, parameters: _Parameters, given: dict[str, Any],
                    arguments: dict[str, Any]) -> None:
    """A parameter without a default that nothing supplies, named before the call: a
    TRL reward reading a column this data lacks (`ground_truth`) would otherwise fail
    with Python's "missing 1 required positional argument", saying nothing of columns."""
    missing = [p for p in parameters.required if p not in given]
    if not missing:
        return
    what = _TRL_ONLY.get(missing[0])
    if what:
        raise RewardError(f"reward '{name}' takes '{missing[0]}' ({what}), which gft does not "
                          "pass; give it a default (e.g. None)")
    columns = sorted(arguments)
    raise RewardError(f"reward '{name}' takes '{missing[0]}', which is no column of the data "
                      f"(it can read: {', '.join(columns)}); add the column, or set "
                      f"answer_column: {missing[0]} if it holds the ground truth")


def _check_values(name: str, returned: Any, n: int,
                  sources: list[str] | None) -> np.ndarray:
    """A list/tuple/1-D array of n finite numbers or None -> float64 [n], NaN for None."""
    # a 1-D array or tensor (numpy, torch, mlx): TRL builds a tensor from whatever the
    # function returns, so such functions run there and must run here too
    if getattr(returned, "ndim", None) == 1 and hasattr(returned, "tolist"):
        returned = returned.tolist()
    if not isinstance(returned, (list, tuple)):
        raise RewardError(f"reward '{name}' returned {type(returned).__name__}; expected a "
                          f"list of {n} floats (or None)")
    if len(returned) != n:
        raise RewardError(f"reward '{name}' returned {len(returned)} values; expected {n} "
                          "(one per completion)")
    values = np.full(n, np.nan)
    for index, value in enumerate(returned):
        if value is None:
            continue
        if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
            value = value.item()  # a 0-d tensor or array in a list
        if not isinstance(value, (int, float, np.integer, np.floating, np.bool_,
                                  fractions.Fraction)):
            raise RewardError(f"reward '{name}' returned {type(value).__name__} "
                              f"{value!r:.40} for {_source(sources, index)}; expected a "
                              "float or None")
        try:
            number = float(value)
        except OverflowError:  # an int or Fraction past float's range
            number = math.inf if value > 0 else -math.inf
        if not math.isfinite(number):
            raise RewardError(f"reward '{name}' returned {number} for "
                              f"{_source(sources, index)}; rewards must be finite"
                              + (" (return None where a reward does not apply)"
                                 if math.isnan(number) else ""))
        values[index] = number
    return values


def _source(sources: list[str] | None, index: int) -> str:
    return sources[index] if sources is not None else f"row {index}"


# ---------------------------------------------------------------------------------------
# Per-function metrics: each reward's mean, for rollouts and dataset responses apart


def function_sums(names: Sequence[str], per_function: Sequence[np.ndarray] | None,
                  on_policy: np.ndarray) -> dict[str, float]:
    """Sum and count of each reward's applicable values (None excluded), in a fixed key
    order from `names`, so that data-parallel ranks add theirs up in one all-reduce.
    per_function: one [N] array per name (NaN = None), or None when nothing was scored."""
    out: dict[str, float] = {}
    for index, name in enumerate(names):
        values = per_function[index] if per_function is not None else np.zeros(0)
        for label, mask in (("rollout", on_policy), ("dataset", ~on_policy)):
            part = values[mask] if len(values) else values
            applicable = part[~np.isnan(part)]
            out[f"rewards/{name}/{label}/sum"] = float(applicable.sum())
            out[f"rewards/{name}/{label}/n"] = float(len(applicable))
    return out


def function_means(sums: dict[str, float]) -> dict[str, float]:
    """rewards/<name>/<rollout|dataset>: the mean where any value applied."""
    return {key[:-len("/sum")]: value / sums[key[:-len("/sum")] + "/n"]
            for key, value in sums.items()
            if key.startswith("rewards/") and key.endswith("/sum")
            and sums[key[:-len("/sum")] + "/n"]}
