"""What reward functions report besides rewards, through TRL's two callbacks: a scalar
(`log_metric(name, value)`, averaged over the step and logged beside gft's metrics) and a
column of the sample table (`log_extra(column, values)`, one value per completion).

A metric name is checked when it is logged, against a fixed set (gft.metrics.METRIC_ROOTS),
not against the step's own keys, which change from step to step (rollout metrics appear
only in steps that sample): a name is accepted or refused alike in every step."""
from __future__ import annotations

import math
from typing import Any, Callable

from gft.errors import RewardError
from gft.metrics import METRIC_ROOTS
from gft.types import SAMPLE_COLUMNS


class LogCallbackError(RewardError):
    """A reward function's misuse of log_metric / log_extra, naming the function."""


class RewardLog:
    """What reward functions report during one batch through TRL's two callbacks:
    log_metric(name, value), a scalar averaged over the step (TRL averages over its
    logging step), and log_extra(column, values), one value per completion for the
    sample table. Each function gets its own pair, so an error names it."""

    def __init__(self, n: int):
        self.n = n  # completions in the batch
        self.metrics: dict[str, list[float]] = {}
        self.columns: dict[str, list[Any]] = {}

    def callbacks(self, reward: str) -> dict[str, Callable]:
        def log_metric(name: str, value: Any) -> None:
            self.metrics.setdefault(_metric_name(reward, name), []).append(
                _finite(reward, name, value))

        def log_extra(column: str, values: Any) -> None:
            if not isinstance(column, str) or not column or column in SAMPLE_COLUMNS \
                    or column in self.columns:
                raise LogCallbackError(
                    f"reward '{reward}': log_extra column {column!r}: expected a new "
                    f"non-empty name, not one of {', '.join(SAMPLE_COLUMNS)} or one logged "
                    "already")
            values = list(values)
            if len(values) != self.n:
                raise LogCallbackError(
                    f"reward '{reward}': log_extra('{column}') got {len(values)} values; "
                    f"expected {self.n} (one per completion)")
            self.columns[column] = [_plain(value) for value in values]

        return {"log_metric": log_metric, "log_extra": log_extra}


def _metric_name(reward: str, name: Any) -> str:
    """A log_metric name of the user's own: not in a namespace gft logs (METRIC_ROOTS)."""
    if not isinstance(name, str) or not name.strip():
        raise LogCallbackError(f"reward '{reward}': log_metric name {name!r}: expected a "
                               "non-empty string")
    if name.split("/")[0] in METRIC_ROOTS:
        raise LogCallbackError(
            f"reward '{reward}': log_metric name '{name}' is in a namespace gft logs itself "
            f"('{name.split('/')[0]}': its metrics, TRL's, train/ or eval/); name it "
            f"otherwise, e.g. 'my/{name}'")
    return name


def _finite(reward: str, name: str, value: Any) -> float:
    try:
        number = float(value)  # a Python, NumPy or 0-d torch/mlx number
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise LogCallbackError(f"reward '{reward}': log_metric('{name}', {value!r}): "
                               "expected a finite number")
    return number


def _plain(value: Any) -> Any:
    """A log_extra cell as JSON and every tracker's table take it: NumPy / torch scalars
    as Python numbers, anything else that is not a plain value as its text."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    return value if value is None or isinstance(value, (str, bool, int, float)) else str(value)


def add_logged(metrics: dict[str, Any], means: dict[str, float]) -> None:
    """log_metric means beside gft's own metrics (in place). _metric_name keeps them out
    of gft's namespaces; a clash left (a key outside METRIC_ROOTS) is still refused: one
    figure would silently replace the other on every dashboard."""
    taken = sorted(set(means) & set(metrics))
    if taken:
        raise RewardError(f"log_metric('{taken[0]}', ...): '{taken[0]}' is one of gft's own "
                          "metrics; log it under another name")
    metrics.update(means)
