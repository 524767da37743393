"""Property: whatever a user types, no gft command shows a traceback or loses saved work.

Hypothesis drives every command (train, generate, eval, convert, fuse, plot, env) in
process through click's CliRunner with random and adversarial option values, config
files, data rows and metrics lines, and checks each run:
- the exit code is a documented one (README "Checkpoints, resuming and errors"): 0, 1
  (the file system failed) or 2 (bad input);
- it ended by `sys.exit` or normally, never with an exception (no traceback);
- an existing run directory that every command may be pointed at (as the output, the
  run to resume, the model, the data, the plot) keeps its checkpoints byte for byte and
  every line of its metrics.jsonl.

Default suite: few examples per command, and `gft train` stops where the model would
load (the property there is the boundary: every bad value is refused before any work;
the rest of a run is covered by tests/test_reliability.py and test_errors.py). With
`pytest -m slow` the same properties run with more examples, and accepted `gft train`
runs really train one step.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli import main
from gft.config import FIELDS, build_config, to_dict
from gft.tiny import TinyModelSpec, write_tiny_model

EXIT_CODES = {0, 1, 2}
FAST = settings(max_examples=6, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))
FEW = settings(FAST, max_examples=3)  # each example draws two PNG figures
SLOW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
# Keys that set how much work a step does: the slow variant fixes them small so that an
# accepted run takes seconds (their bad values are drawn in the default variant).
SIZE_KEYS = {"max_steps", "epochs", "prompts_per_step", "prompts_per_minibatch",
             "micro_batch_size", "max_response_tokens", "max_prompt_tokens",
             "rollout_batch_size", "eval_samples", "num_rollouts", "num_offpolicy", "stages",
             "eval_every", "save_every", "sample_every", "output_dir", "model", "data",
             "progress", "reward_timeout", "lora_rank", "gradient_checkpointing"}
SMALL = ["--max-steps", "1", "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
         "--set", "micro_batch_size=4", "--set", "max_response_tokens=3", "--set",
         "rollout_batch_size=8", "--set", "eval_samples=1", "--set", "num_rollouts=2",
         "--set", "num_offpolicy=1", "--set", "progress=false", "--set", "stages=null"]

# argv can hold any text but NUL; an option value is one such string
ARG_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                   max_size=12)
SPECIAL = st.sampled_from(["", " ", "-1", "0", "1", "2", "1e309", "-1e-9", "nan", "inf", "null",
                           "[]", "{}", "[1, 2]", "{a: 1}", "true", "no", "é", "cuda", "cuda:7",
                           "cpu", "mps", "foo", str(2**63), str(2**64), "-" * 3, "1.5", "0.0",
                           "[sft: 1]", "[{sft: 0}]", "[{gft: 1, model: x}]", "[{preset: x}]",
                           "5GB", "0B", "abc:def", "math", "[exact]"])
VALUE = st.one_of(SPECIAL, st.integers(-2**70, 2**70).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr), ARG_TEXT)
KEY = st.one_of(st.sampled_from(sorted(FIELDS)), st.sampled_from(["", "nope", "Seed", "="]))


# ---------------------------------------------------------------------------------------
# The world every command runs in


class World:
    """A tiny model, a data file, and an existing run whose files must survive."""

    def __init__(self, root: Path):
        self.root = root
        self.model = write_tiny_model(root / "model", TinyModelSpec(seed=0))
        self.data = root / "data.jsonl"
        self.data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": "yes",
                                                 "answer": "yes"}) + "\n" for i in range(4)))
        self.run = root / "run"
        self._save_run()
        self.snapshot = self.protected()

    def _save_run(self) -> None:
        """A run at step 1 (as a finished 1-step run leaves it), without training: the
        tiny model's files and empty AdamW moments (what a backend saves before its first
        update)."""
        from safetensors.numpy import save_file
        from gft.checkpoint import save_checkpoint, save_step_checkpoint
        from gft.loop import LoopState
        cfg = build_config({}, {"model": str(self.model), "data": str(self.data),
                                "backend": "torch", "max_steps": 1, "output_dir": str(self.run)})

        class Saved:
            def save_model(self, path: Path) -> None:
                shutil.copytree(world_model, path, dirs_exist_ok=True)

            def save_optimizer(self, path: Path) -> None:
                save_file({}, str(path), metadata={"format": "gft-adamw", "step": "0"})
        world_model, backend = self.model, Saved()
        state = {"loop": asdict(LoopState(step=1, position=2)), "config": to_dict(cfg),
                 "backend": "torch"}
        save_step_checkpoint(backend, self.run, 1, state, keep=2)
        save_checkpoint(backend, self.run / "final", state)
        (self.run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        (self.run / "metrics.jsonl").write_text(
            '{"step": 0, "eval/accuracy": 0.0}\n{"step": 1, "loss": 1.5, "entropy": 2.0}\n')

    def protected(self) -> dict[str, bytes | list[str]]:
        """Every checkpoint file's digest, and the metrics lines."""
        out: dict[str, bytes | list[str]] = {}
        for part in ("final", "checkpoints"):
            for f in sorted((self.run / part).rglob("*")):
                if f.is_file():
                    out[str(f.relative_to(self.run))] = hashlib.sha256(f.read_bytes()).digest()
        out["metrics"] = (self.run / "metrics.jsonl").read_text().splitlines()
        return out

    def fresh(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("property"))


def paths(world: World):
    """Where a path argument may point: new, the protected run, its checkpoint, a file..."""
    return st.sampled_from(["new", "run", "final", "model", "data", "missing", "file", "root"]
                           ).map(lambda k: _path(world, k))


def _path(world: World, kind: str) -> str:
    fresh = world.fresh()
    return str({"new": fresh / "out", "run": world.run, "final": world.run / "final",
                "model": world.model, "data": world.data, "missing": fresh / "no" / "where",
                "file": world.data, "root": fresh}[kind])


class Accepted(Exception):
    """The default variant stops an accepted `gft train` where the model would load."""


def invoke(world: World, args: list[str], *, stop_at_model: bool = False):
    patch = (mock.patch("gft.run.open_backend", side_effect=Accepted) if stop_at_model
             else nullcontext())
    with patch:
        result = CliRunner().invoke(main, args)
    accepted = isinstance(result.exception, Accepted)
    assert accepted or result.exception is None or isinstance(result.exception, SystemExit), (
        args, repr(result.exception), result.output)
    assert "Traceback" not in result.output, (args, result.output)
    if not accepted:
        assert result.exit_code in EXIT_CODES, (args, result.exit_code, result.output)
    return result, accepted


def assert_run_intact(world: World, args: list[str]) -> None:
    now = world.protected()
    assert now == world.snapshot, (args, set(now) ^ set(world.snapshot))


# ---------------------------------------------------------------------------------------
# gft train


def _train_args(data, world: World, slow: bool) -> list[str]:
    keys = KEY.filter(lambda k: k not in SIZE_KEYS) if slow else KEY
    sets = data.draw(st.lists(st.tuples(keys, VALUE), max_size=3))
    args = ["train"]
    if data.draw(st.booleans()):  # a YAML config file: random keys and values, or bytes
        config = world.fresh() / "job.yaml"
        content = data.draw(st.one_of(
            st.dictionaries(st.one_of(KEY, st.integers(), st.none()), VALUE, max_size=3)
            .map(lambda d: yaml.safe_dump(d).encode()),
            st.binary(max_size=30)))
        config.write_bytes(content)
        args.append(str(config))
    resume = data.draw(st.sampled_from([None, "run", "new", "missing", "file"]))
    if resume is not None:
        args = ["train", "--resume", _path(world, resume)]
    else:
        args += ["--model", data.draw(st.sampled_from([str(world.model), _path(world, "final"),
                                                       _path(world, "missing")])),
                 "--data", data.draw(st.sampled_from([str(world.data), _path(world, "model"),
                                                      _path(world, "missing")])),
                 "-o", data.draw(paths(world)), "--backend", "torch"]
    for key, value in sets:
        args += ["--set", f"{key}={value}"]
    for option in data.draw(st.lists(st.sampled_from(["--seed", "--max-steps", "--preset",
                                                      "--backend", "--nproc"]), max_size=2)):
        args += [option, data.draw(VALUE)]
    if slow and resume is None:
        args += SMALL
    return args


@FAST
@given(data=st.data())
def test_train_never_a_traceback_nothing_lost(world, data):
    args = _train_args(data, world, slow=False)
    invoke(world, args, stop_at_model=True)
    assert_run_intact(world, args)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_train_never_a_traceback_nothing_lost_slow(world, data):
    args = _train_args(data, world, slow=True)
    result, _ = invoke(world, args)
    if result.exit_code == 0 and str(world.run) in args and "--resume" in args:
        # a resume that ran may save and re-export final/; its log keeps every old line
        before, now = world.snapshot["metrics"], world.protected()
        assert now["metrics"][:len(before)] == before, (args, now["metrics"])
        world.snapshot = now
    else:
        assert_run_intact(world, args)


# ---------------------------------------------------------------------------------------
# gft generate, eval


def _generate_args(data, world: World) -> list[str]:
    args = ["generate", data.draw(st.sampled_from([str(world.model), _path(world, "final"),
                                                   _path(world, "missing"), _path(world, "run")]))]
    for prompt in data.draw(st.lists(ARG_TEXT, min_size=1, max_size=2)):
        args += ["-p", prompt]
    args += ["--max-new-tokens", data.draw(st.sampled_from(["1", "3", "0", "-2", "x", "300"]))]
    for option in data.draw(st.lists(st.sampled_from(["-n", "--temperature", "--top-p",
                                                      "--seed", "--dtype", "--backend"]),
                                     max_size=3)):
        args += [option, data.draw(st.one_of(SPECIAL, st.sampled_from(
            ["2", "0.5", "bfloat16", "float32", "torch", "mlx"])))]
    return args


def _eval_args(data, world: World) -> list[str]:
    rows = data.draw(st.lists(st.one_of(
        st.fixed_dictionaries({"prompt": ARG_TEXT, "answer": VALUE}),
        st.dictionaries(st.sampled_from(["prompt", "answer", "messages", "completion", "x"]),
                        st.one_of(VALUE, st.integers(), st.none(), st.lists(VALUE, max_size=2)),
                        max_size=3)), max_size=3))
    file = world.fresh() / "test.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    file.write_bytes(text.encode() + data.draw(st.sampled_from([b"", b"{bad\n", b"\xff\n"])))
    args = ["eval", data.draw(st.sampled_from([str(world.model), _path(world, "missing")])),
            "--data", data.draw(st.sampled_from([str(file), _path(world, "run"),
                                                 _path(world, "missing")])),
            "--split", "test", "--max-new-tokens", "2"]
    for option in data.draw(st.lists(st.sampled_from(["--limit", "-k", "--temperature",
                                                      "--rewards", "--seed"]), max_size=2)):
        args += [option, data.draw(st.one_of(SPECIAL, st.sampled_from(["1", "2", "exact"])))]
    return args


@FAST
@given(data=st.data())
def test_generate_never_a_traceback(world, data):
    args = _generate_args(data, world)
    invoke(world, args)
    assert_run_intact(world, args)


@FAST
@given(data=st.data())
def test_eval_never_a_traceback(world, data):
    args = _eval_args(data, world)
    invoke(world, args)
    assert_run_intact(world, args)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_generate_and_eval_slow(world, data):
    for args in (_generate_args(data, world), _eval_args(data, world)):
        invoke(world, args)
        assert_run_intact(world, args)


# ---------------------------------------------------------------------------------------
# gft convert, fuse, plot, env


def _convert_or_fuse_args(data, world: World) -> list[str]:
    command = data.draw(st.sampled_from(["convert", "fuse"]))
    args = [command, data.draw(paths(world)), data.draw(paths(world))]
    options = ["--dtype", "--shard-size", "--base"] + (["--to"] if command == "convert" else [])
    for option in data.draw(st.lists(st.sampled_from(options), max_size=2)):
        args += [option, data.draw(st.one_of(SPECIAL, st.sampled_from(
            ["float16", "bfloat16", "peft", "mlx-lm", "1KB", str(world.model)])))]
    return args


def _plot_args(data, world: World) -> list[str]:
    run = world.fresh()
    lines = data.draw(st.lists(st.one_of(
        st.fixed_dictionaries({"step": st.one_of(st.integers(), VALUE)},
                              optional={"entropy": st.one_of(VALUE, st.floats()),
                                        "reward/rollout": st.floats()}).map(json.dumps),
        ARG_TEXT), max_size=4))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    target = data.draw(st.sampled_from([run, world.run, world.model]))
    args = ["plot", str(target), "-o", str(world.fresh() / "all.png")]
    if data.draw(st.booleans()):
        args += ["--smooth", data.draw(VALUE)]
    return args


@FAST
@given(data=st.data())
def test_convert_and_fuse_never_a_traceback_nothing_lost(world, data):
    args = _convert_or_fuse_args(data, world)
    invoke(world, args)
    assert_run_intact(world, args)


@FEW
@given(data=st.data())
def test_plot_never_a_traceback_nothing_lost(world, data):
    args = _plot_args(data, world)
    invoke(world, args)
    assert_run_intact(world, args)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_convert_fuse_plot_slow(world, data):
    for args in (_convert_or_fuse_args(data, world), _plot_args(data, world)):
        invoke(world, args)
        assert_run_intact(world, args)


def test_env_runs(world):
    result, _ = invoke(world, ["env"])
    assert result.exit_code == 0 and "backend torch:" in result.output
