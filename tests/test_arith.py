"""The bundled arithmetic task: deterministic, held out properly, verifiable, short."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from gft.errors import ConfigError
from gft.tasks.arith import (PROMPT_SUFFIX, ArithTaskConfig, default_task_dir, generate_split,
                             split_problems, write_task)

# The bounds the default job is sized for (a byte-level model pays per character).
MAX_PROMPT_CHARS = 60
MAX_RESPONSE_CHARS = 22


def grade(response: str, answer: str) -> bool:
    """The verifier the trainer uses: math-verify equivalence against the gold answer."""
    from math_verify import parse, verify
    return bool(verify(parse(f"${answer}$"), parse(response)))


def test_same_seed_gives_identical_files(tmp_path):
    cfg = ArithTaskConfig(n_train=300)
    a, b = write_task(tmp_path / "a", cfg), write_task(tmp_path / "b", cfg)
    c = write_task(tmp_path / "c", replace(cfg, seed=1))
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "task.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and set(rows[0]) == {"prompt", "answer", "completions"}


@pytest.mark.parametrize("cfg", [ArithTaskConfig(),
                                 ArithTaskConfig(seed=7, ops=("+", "-", "*"), max_operand=12)])
def test_splits_are_disjoint(cfg):
    problems = split_problems(cfg)
    train, valid, test = (set(problems[s]) for s in ("train", "valid", "test"))
    assert len(test) == cfg.n_test and len(valid) == cfg.n_valid
    assert not (train & test) and not (train & valid) and not (valid & test)
    # Each held-out fact is still taught in train, under another phrasing.
    train_facts = {(a, op, b) for a, op, b, _ in train}
    assert all((a, op, b) in train_facts for a, op, b, _ in test | valid)
    # And no held-out prompt text ever appears in train.
    rows = {s: generate_split(cfg, s) for s in ("train", "valid", "test")}
    train_prompts = {r["prompt"] for r in rows["train"]}
    assert not train_prompts & {r["prompt"] for r in rows["test"] + rows["valid"]}
    assert len({r["prompt"] for r in rows["test"]}) == cfg.n_test


def test_expert_demonstrations_verify_and_teacher_errors_match_the_rate():
    cfg = ArithTaskConfig(n_train=400, teacher_error_rate=0.25)
    rows = generate_split(cfg, "train") + generate_split(cfg, "test")
    teacher_wrong = teacher_total = 0
    for row in rows:
        expert, *teachers = row["completions"]
        assert len(teachers) == cfg.n_teacher
        assert grade(expert, row["answer"]), row
        teacher_wrong += sum(not grade(t, row["answer"]) for t in teachers)
        teacher_total += len(teachers)
    # 1500 Bernoulli(0.25) draws: standard deviation ≈ 0.011, so ±0.04 is > 3.5 sigma.
    assert abs(teacher_wrong / teacher_total - 0.25) < 0.04


def test_error_rate_extremes():
    for rate, want in ((0.0, 0), (1.0, 3)):
        rows = generate_split(ArithTaskConfig(n_train=50, teacher_error_rate=rate), "train")
        for row in rows:
            wrong = sum(not grade(t, row["answer"]) for t in row["completions"][1:])
            assert wrong == want


def test_prompt_and_response_lengths_stay_bounded():
    for cfg in (ArithTaskConfig(), ArithTaskConfig(ops=("+", "-", "*"))):
        for split in ("train", "valid", "test"):
            for row in generate_split(cfg, split):
                assert row["prompt"].endswith(PROMPT_SUFFIX)
                assert len(row["prompt"]) <= MAX_PROMPT_CHARS, row["prompt"]
                assert row["prompt"].isascii()
                for response in row["completions"]:
                    assert len(response) <= MAX_RESPONSE_CHARS, response
                    assert response.startswith(" ") and response.isascii()
                assert 0 <= int(row["answer"])


def test_default_task_dir_is_written_once(tmp_path):
    cfg = ArithTaskConfig(n_train=100)
    first = default_task_dir(tmp_path, cfg)
    assert sorted(p.name for p in first.iterdir()) == [
        "task.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
    stamp = (first / "train.jsonl").stat().st_mtime_ns
    assert default_task_dir(tmp_path, cfg) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == stamp
    assert default_task_dir(tmp_path, replace(cfg, seed=1)) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_bad_configs_are_config_errors():
    for cfg in (ArithTaskConfig(ops=("/",)), ArithTaskConfig(max_operand=0),
                ArithTaskConfig(teacher_error_rate=1.5), ArithTaskConfig(n_test=10_000)):
        with pytest.raises(ConfigError):
            generate_split(cfg, "train")
    with pytest.raises(ConfigError):
        generate_split(ArithTaskConfig(), "dev")
