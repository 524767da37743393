"""The bundled arithmetic task: deterministic, held out properly, verifiable, short."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from gft.errors import ConfigError
from gft.tasks.arith import (PROMPT_SUFFIX, SPLITS, TEST_SPLITS, ArithTaskConfig, all_facts,
                             big_problems, chain_problems, default_task_dir, generate_split,
                             reword_problems, split_problems, train_order, write_task)

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
    for name in [f"{split}.jsonl" for split in SPLITS] + ["task.json"]:
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


# The out-of-distribution splits ask longer questions (two-digit operands, three operands).
OOD_PROMPT_CHARS, OOD_RESPONSE_CHARS = 66, 30
CONFIGS = [ArithTaskConfig(), ArithTaskConfig(seed=7, ops=("+", "-", "*"), max_operand=12),
           ArithTaskConfig(seed=3, max_operand=19, n_test=200)]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_no_test_split_holds_a_training_problem(cfg):
    """Every test split, and the flawed training data's, is disjoint from training: no
    prompt text in common, and each split differs from training the way it says."""
    rows = {s: generate_split(cfg, s) for s in SPLITS}
    train_prompts = {r["prompt"] for r in rows["train"]}
    for split in (*TEST_SPLITS, "valid"):
        assert rows[split], split
        assert not train_prompts & {r["prompt"] for r in rows[split]}, split
        assert len({r["prompt"] for r in rows[split]}) == len(rows[split]), split  # distinct
    train_problems = set(train_order(cfg)[0])
    train_facts = {(a, op, b) for a, op, b, _ in train_problems}
    # test: a held-out (fact, phrasing); test_big: facts outside the training range entirely
    assert not set(split_problems(cfg)["test"]) & train_problems
    big = big_problems(cfg)
    assert len(big) == cfg.n_ood and not {(a, op, b) for a, op, b, _ in big} & train_facts
    assert all(min(a, b) > cfg.max_operand for a, _, b, _ in big)
    assert max(max(a, b) for a, _, b, _ in train_problems) <= cfg.max_operand
    # test_chain: two operations per question, where every training question has one
    chain = chain_problems(cfg)
    assert len(chain) == cfg.n_ood and all(len(p) == 6 for p in chain)
    numbers = lambda prompt: len(re.findall(r"\d+", prompt))  # noqa: E731
    assert all(numbers(r["prompt"]) == 3 for r in rows["test_chain"])
    assert all(numbers(r["prompt"]) == 2 for r in rows["train"])
    # test_reword: facts training teaches, in wording and with nouns no training prompt has
    reword = reword_problems(cfg)
    assert len(reword) == min(cfg.n_ood, len(all_facts(cfg)))
    assert {(a, op, b) for a, op, b, _ in reword} <= train_facts
    skeleton = lambda prompt: re.sub(r"\d+|[A-Z][a-z]+ |\b[a-z]+s\b", "#", prompt)  # noqa: E731
    assert not {skeleton(r["prompt"]) for r in rows["train"]} & {skeleton(r["prompt"]) for r in rows["test_reword"]}
    train_words = {w for r in rows["train"] for w in re.findall(r"[A-Za-z]+", r["prompt"])}
    for row in rows["test_reword"]:
        new = set(re.findall(r"[A-Za-z]+", row["prompt"])) - train_words
        assert new, row  # every question has wording training never showed


@pytest.mark.parametrize("split", TEST_SPLITS)
def test_every_test_answer_is_right_and_verifies(split):
    from gft.tasks.arith import APPLY
    for row in generate_split(ArithTaskConfig(max_operand=19), split):
        assert grade(row["completions"][0], row["answer"]), row  # the worked demonstration
        nums = [int(x) for x in re.findall(r"\d+", row["prompt"])]
        words = re.findall(r"\b(plus|minus|more|away)\b", row["prompt"])
        assert len(words) == len(nums) - 1, row
        want = nums[0]
        for x, w in zip(nums[1:], words):  # left to right, as the question reads
            want = APPLY["+" if w in ("plus", "more") else "-"](want, x)
        assert int(row["answer"]) == want >= 0, row


def test_flawed_training_rows_differ_only_in_the_stated_flaw():
    cfg = ArithTaskConfig(n_train=1000, expert_error_rate=0.3)
    clean, flawed = generate_split(cfg, "train"), generate_split(cfg, "train_flawed")
    assert [r["prompt"] for r in clean] == [r["prompt"] for r in flawed]
    wrong = 0
    for c, f in zip(clean, flawed):
        assert c["answer"] == f["answer"] and c["completions"][1:] == f["completions"][1:]
        assert grade(c["completions"][0], c["answer"])
        if f["completions"][0] != c["completions"][0]:
            wrong += 1
            assert not grade(f["completions"][0], f["answer"])  # wrong, not just reworded
            claimed = int(f["completions"][0].split("{")[1].rstrip("}"))
            assert abs(claimed - int(c["answer"])) == 1 and claimed >= 0
    # 1000 Bernoulli(0.3) draws: standard deviation ~0.0145, so +-0.05 is > 3 sigma
    assert abs(wrong / len(clean) - 0.3) < 0.05
    none = generate_split(ArithTaskConfig(n_train=50, expert_error_rate=0.0), "train_flawed")
    assert none == generate_split(ArithTaskConfig(n_train=50, expert_error_rate=0.0), "train")


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
        for split in ("test_big", "test_chain", "test_reword"):
            for row in generate_split(cfg, split):
                assert len(row["prompt"]) <= OOD_PROMPT_CHARS and row["prompt"].isascii(), row
                assert all(len(r) <= OOD_RESPONSE_CHARS for r in row["completions"]), row


def test_default_task_dir_is_written_once(tmp_path):
    cfg = ArithTaskConfig(n_train=100)
    first = default_task_dir(tmp_path, cfg)
    assert sorted(p.name for p in first.iterdir()) == sorted(
        ["task.json", *(f"{split}.jsonl" for split in SPLITS)])
    stamp = (first / "train.jsonl").stat().st_mtime_ns
    assert default_task_dir(tmp_path, cfg) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == stamp
    assert default_task_dir(tmp_path, replace(cfg, seed=1)) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_bad_configs_are_config_errors():
    for cfg in (ArithTaskConfig(ops=("/",)), ArithTaskConfig(max_operand=0),
                ArithTaskConfig(teacher_error_rate=1.5), ArithTaskConfig(n_test=10_000),
                ArithTaskConfig(expert_error_rate=-0.1), ArithTaskConfig(n_ood=-1)):
        with pytest.raises(ConfigError):
            generate_split(cfg, "train")
    with pytest.raises(ConfigError):
        generate_split(ArithTaskConfig(), "dev")
    assert generate_split(ArithTaskConfig(ops=("*",), n_test=10), "test_chain") == []
