"""The built-in verifiable rewards, each a factory (options -> RewardFunction) in
BUILTIN_REWARDS: `math` (math_verify equivalence of the final answer with `answer`),
`exact` (stripped string equality) and `regex` (a pattern, optionally capturing the
answer). They follow the calling convention gft/rewards.py describes (TRL's), so a
user's function and a built-in one are called, checked and combined alike there.
"""
from __future__ import annotations

import decimal
import functools
import re
import threading
from typing import Any, Callable, Protocol, Sequence

from gft.errors import ConfigError, RewardError


class RewardFunction(Protocol):
    """What a reward is: one float (or None = "not applicable") per completion, called
    by keyword (prompts=, completions=, completion_ids=, trainer_state=, columns)."""

    def __call__(self, *, completions: list, **kwargs: Any) -> list[float | None]: ...


class MissingColumnError(RewardError):
    """A row lacks a value the reward needs; `score` adds the row's source."""

    def __init__(self, column: str, index: int):
        super().__init__(f"row {index}: column '{column}' is missing (None)")
        self.column, self.index = column, index


# ---------------------------------------------------------------------------------------
# Built-in rewards. Each entry of BUILTIN_REWARDS is a factory: options -> RewardFunction.

def _require(values: Sequence[Any], index: int, column: str) -> Any:
    """values[index], or a MissingColumnError when it is None."""
    if values[index] is None:
        raise MissingColumnError(column, index)
    return values[index]


def _content(completion: Any) -> str:
    """The text of a completion in either form: a string, or TRL's conversational
    [{"role": "assistant", "content": text}]."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return completion


def _math_timeout() -> int | None:
    """math_verify's timeouts use SIGALRM, which only the main thread may set."""
    return 5 if threading.current_thread() is threading.main_thread() else None


# A number in scientific notation, e.g. "1.5e-05" (how Python prints small floats):
# math_verify reads it as LaTeX, 1.5·e − 5. Gold answers and completions are rewritten
# positionally ("0.000015") before parsing, so either way of writing it compares equal.
_SCIENTIFIC = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d{1,3}(?!\w|\.\d)")


def _positional(text: str) -> str:
    """Every number in scientific notation in `text`, written without an exponent."""
    return _SCIENTIFIC.sub(lambda m: format(decimal.Decimal(m.group()), "f"), text)

# Math delimiters in an answer: a `$` that is not escaped (MATH's "\\$18.90" is a dollar
# sign, and parsed as written it gives nothing), \\boxed, \\( ... \\).
_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(")


@functools.lru_cache(maxsize=65536)
def _parse_gold(answer: str, timeout: int | None) -> tuple:
    """Parse a ground-truth answer once (the same answer is scored against G completions).

    A bare answer is wrapped in `$...$` so that it is read as LaTeX: parsed directly,
    "2\\sqrt{3}" would become 2 and "x^2+1" nothing at all. Answers that already carry
    delimiters are parsed as written; plain text falls back to a direct parse.
    """
    from math_verify import parse
    stripped = answer.strip()
    stripped = _positional(stripped)
    if _DELIMITED.search(stripped):
        return tuple(parse(stripped, parsing_timeout=timeout))
    gold = parse(f"${stripped}$", parsing_timeout=timeout)
    return tuple(gold or parse(stripped, parsing_timeout=timeout))


def make_math_reward() -> RewardFunction:
    """1.0 when the completion's final answer (the last `\\boxed{}`, else the last number
    or expression) is mathematically equal to `answer`, per math_verify; else 0.0.
    None when the gold answer itself cannot be parsed (nothing to compare against)."""
    from math_verify import parse, verify  # imports sympy: pay for it only when used

    def math_reward(completions: list, answer: list, **_: Any) -> list[float | None]:
        timeout = _math_timeout()
        scores: list[float | None] = []
        for index, completion in enumerate(completions):
            gold = _parse_gold(str(_require(answer, index, "answer")), timeout)
            if not gold:
                scores.append(None)
                continue
            prediction = parse(_positional(_content(completion)), parsing_timeout=timeout)
            scores.append(1.0 if verify(list(gold), prediction,
                                        timeout_seconds=timeout) else 0.0)
        return scores

    return math_reward


def make_exact_reward() -> RewardFunction:
    """1.0 when the completion equals `answer`, ignoring surrounding whitespace."""

    def exact_reward(completions: list, answer: list, **_: Any) -> list[float | None]:
        return [1.0 if _content(completion).strip()
                == str(_require(answer, i, "answer")).strip() else 0.0
                for i, completion in enumerate(completions)]

    return exact_reward


def make_regex_reward(pattern: str) -> RewardFunction:
    """1.0 when `pattern` is found in the completion (re.search). If the pattern has a
    group named `answer`, the captured text (stripped) must also equal `answer`."""
    if not isinstance(pattern, str):
        raise ConfigError(f"reward 'regex': option 'pattern' must be a string, "
                          f"got {type(pattern).__name__}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward 'regex': bad pattern {pattern!r}: {exc}") from exc
    checks_answer = "answer" in compiled.groupindex

    def regex_reward(completions: list, answer: list, **_: Any) -> list[float | None]:
        scores: list[float | None] = []
        for index, completion in enumerate(completions):
            match = compiled.search(_content(completion))
            if match is None or not checks_answer:
                scores.append(0.0 if match is None else 1.0)
                continue
            expected = str(_require(answer, index, "answer")).strip()
            captured = match.group("answer")
            scores.append(1.0 if captured is not None and captured.strip() == expected
                          else 0.0)
        return scores

    return regex_reward


BUILTIN_REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "math": make_math_reward,
    "exact": make_exact_reward,
    "regex": make_regex_reward,
}
