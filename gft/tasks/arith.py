"""The bundled default task: tiny arithmetic word problems with noisy teacher answers.

The default `gft train` job trains a ~100k-parameter byte-level model from random init on
2 CPU cores in a few minutes, so everything here is short: one-digit operands, prompts of
at most ~60 characters ending in "\\nA:", responses of at most ~20 characters whose final
answer sits in \\boxed{} so math-verify grades them.

Each row is {"prompt", "answer", "completions"}: completions[0] is the expert worked
demonstration (always correct); the rest are "teacher" answers in other styles, a
`teacher_error_rate` fraction of which are off by one — like real distilled data, the
off-policy responses are scored by the verifier, not assumed correct.

    prompt:      "There are 6 eggs. 4 go away. How many are left?\\nA:"
    answer:      "2"
    completions: [" 6-4=2. \\boxed{2}", " 2+4=6. \\boxed{2}", " \\boxed{3}", " 6-4 is 2. \\boxed{2}"]

Held-out split: a problem is the tuple (a, op, b, template). Test and valid problems are
disjoint from train problems, but each held-out fact (a, op, b) still appears in train
under its other templates — a character model this small cannot infer unseen addition
facts, while it can learn to read a new phrasing of a known one, so held-out accuracy
measures reading the question and doing the sum, and it visibly rises during training.
Generation is deterministic in `seed` (Python's `random.Random`, seeded by strings).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gft.errors import ConfigError

GENERATOR_VERSION = 1  # bump when templates or sampling change: invalidates cached task dirs
PROMPT_SUFFIX = "\nA:"  # where the question ends and the answer begins
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Zoe")
ITEMS = ("apples", "pens", "cats", "eggs", "cards", "books")

# Several phrasings per operation, so a held-out phrasing of a known fact can be tested.
TEMPLATES = {
    "+": ("{name} has {a} {item} and gets {b} more. How many now?",
          "There are {a} {item}. {b} more come. How many in all?",
          "What is {a} plus {b}?"),
    "-": ("{name} has {a} {item} and gives away {b}. How many left?",
          "There are {a} {item}. {b} go away. How many are left?",
          "What is {a} minus {b}?"),
    "*": ("{name} has {a} bags of {b} {item}. How many {item}?",
          "There are {a} rows of {b} {item}. How many in all?",
          "What is {a} times {b}?"),
}
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithTaskConfig:
    """How the arithmetic task is generated. Same config → byte-identical files."""
    seed: int = field(default=0, metadata={"help": "Seed for the split, the sampling and the teacher errors."})
    n_train: int = field(default=2000, metadata={
        "help": "Training rows; problems repeat (with new names/items) once the train pool is used up."})
    n_valid: int = field(default=32, metadata={"help": "Validation rows, held out like test (small: for quick evals)."})
    n_test: int = field(default=100, metadata={"help": "Test rows: one held-out problem each, all distinct."})
    max_operand: int = field(default=9, metadata={
        "help": "Operands are drawn from 0..max_operand (the difficulty knob; 9 keeps prompts short)."})
    ops: tuple[str, ...] = field(default=("+", "-"), metadata={
        "help": "Operations among '+', '-', '*'. Subtraction only asks for non-negative results."})
    n_teacher: int = field(default=3, metadata={"help": "Teacher answers per row, after the expert demonstration."})
    teacher_error_rate: float = field(default=0.25, metadata={
        "help": "Probability that each teacher answer is wrong (off by one)."})


Problem = tuple[int, str, int, int]  # (a, op, b, template index)


def validate_config(cfg: ArithTaskConfig) -> None:
    """Raise ConfigError for a config that cannot produce the requested splits."""
    bad_ops = [op for op in cfg.ops if op not in TEMPLATES]
    if not cfg.ops or bad_ops:
        raise ConfigError(f"arith ops must be a non-empty subset of {sorted(TEMPLATES)}, got {cfg.ops!r}")
    if cfg.max_operand < 1:
        raise ConfigError(f"arith max_operand must be at least 1, got {cfg.max_operand}")
    if not 0.0 <= cfg.teacher_error_rate <= 1.0:
        raise ConfigError(f"arith teacher_error_rate must be in [0, 1], got {cfg.teacher_error_rate}")
    if min(cfg.n_train, cfg.n_valid, cfg.n_test, cfg.n_teacher) < 0:
        raise ConfigError("arith n_train, n_valid, n_test and n_teacher must be non-negative")
    n_facts = len(all_facts(cfg))
    if cfg.n_test + cfg.n_valid > n_facts:
        raise ConfigError(f"arith n_test + n_valid = {cfg.n_test + cfg.n_valid} exceeds the {n_facts} "
                          f"distinct facts for ops={cfg.ops!r}, max_operand={cfg.max_operand}")


def all_facts(cfg: ArithTaskConfig) -> list[tuple[int, str, int]]:
    """Every (a, op, b) the config allows, in a fixed order."""
    r = range(cfg.max_operand + 1)
    return [(a, op, b) for op in cfg.ops for a in r for b in r if op != "-" or a >= b]


def split_problems(cfg: ArithTaskConfig) -> dict[str, list[Problem]]:
    """Partition all (a, op, b, template) problems into disjoint train / valid / test.

    n_test + n_valid facts are held out, each with one randomly chosen template; the train
    pool is every other problem, so held-out facts stay in train under other phrasings.
    """
    validate_config(cfg)
    rng = random.Random(f"arith/{cfg.seed}/split")
    facts = all_facts(cfg)
    rng.shuffle(facts)
    held = [(a, op, b, rng.randrange(len(TEMPLATES[op]))) for a, op, b in facts[:cfg.n_test + cfg.n_valid]]
    test, valid = held[:cfg.n_test], held[cfg.n_test:]
    held_set = set(held)
    train = [(a, op, b, t) for a, op, b in all_facts(cfg) for t in range(len(TEMPLATES[op]))
             if (a, op, b, t) not in held_set]
    return {"train": train, "valid": valid, "test": test}


def expert_solution(a: int, op: str, b: int, c: int) -> str:
    """The worked demonstration: the equation, then the boxed result."""
    return f" {a}{op}{b}={c}. \\boxed{{{c}}}"


def teacher_solution(style: int, a: int, op: str, b: int, c: int) -> str:
    """A teacher answer in one of three styles; `c` may be wrong (then it is wrong throughout)."""
    if style == 0:  # the other order (subtraction: check by adding back)
        eq = f"{c}+{b}={a}" if op == "-" else f"{b}{op}{a}={c}"
        return f" {eq}. \\boxed{{{c}}}"
    if style == 1:  # answer only
        return f" \\boxed{{{c}}}"
    return f" {a}{op}{b} is {c}. \\boxed{{{c}}}"


N_TEACHER_STYLES = 3


def wrong_answer(c: int, rng: random.Random) -> int:
    """An off-by-one mistake that stays non-negative."""
    return c + 1 if c == 0 else c + rng.choice((-1, 1))


def make_row(problem: Problem, cfg: ArithTaskConfig, rng: random.Random) -> dict:
    """One JSON row for a problem, with the expert demonstration and teacher answers."""
    a, op, b, t = problem
    c = APPLY[op](a, b)
    prompt = TEMPLATES[op][t].format(a=a, b=b, name=rng.choice(NAMES), item=rng.choice(ITEMS))
    completions = [expert_solution(a, op, b, c)]
    first_style = rng.randrange(N_TEACHER_STYLES)  # vary which styles a row gets when n_teacher < 3
    for k in range(cfg.n_teacher):
        claimed = wrong_answer(c, rng) if rng.random() < cfg.teacher_error_rate else c
        completions.append(teacher_solution((first_style + k) % N_TEACHER_STYLES, a, op, b, claimed))
    return {"prompt": prompt + PROMPT_SUFFIX, "answer": str(c), "completions": completions}


def generate_split(cfg: ArithTaskConfig, split: str) -> list[dict]:
    """The rows of one split ("train", "valid" or "test"), deterministic in cfg.

    Train cycles through its shuffled pool (reshuffled each pass) until n_train rows;
    valid and test have one row per held-out problem.
    """
    if split not in SPLIT_FILES:
        raise ConfigError(f"arith split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    pool = split_problems(cfg)[split]
    rng = random.Random(f"arith/{cfg.seed}/{split}")
    if split != "train":
        return [make_row(p, cfg, rng) for p in pool]
    if not pool and cfg.n_train:
        raise ConfigError("arith: every problem is held out; lower n_test/n_valid or raise max_operand")
    order: list[Problem] = []
    while len(order) < cfg.n_train:
        batch = list(pool)
        rng.shuffle(batch)
        order.extend(batch)
    return [make_row(p, cfg, rng) for p in order[:cfg.n_train]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, '\\n' endings."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def config_record(cfg: ArithTaskConfig) -> dict:
    """What task.json records: the generator version and the full config."""
    return {"task": "arith", "generator_version": GENERATOR_VERSION, "config": asdict(cfg)}


def write_task(directory: str | Path, cfg: ArithTaskConfig = ArithTaskConfig()) -> Path:
    """Write train.jsonl, valid.jsonl, test.jsonl and task.json into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for split, name in SPLIT_FILES.items():
        write_jsonl(out / name, generate_split(cfg, split))
    (out / "task.json").write_text(json.dumps(config_record(cfg), indent=2, sort_keys=True) + "\n")
    return out


def task_dir_name(cfg: ArithTaskConfig) -> str:
    """A cache folder name that changes whenever the config or the generator does."""
    digest = hashlib.sha256(json.dumps(config_record(cfg), sort_keys=True).encode()).hexdigest()
    return f"arith-v{GENERATOR_VERSION}-{digest[:12]}"


def default_task_dir(cache_root: str | Path, cfg: ArithTaskConfig = ArithTaskConfig()) -> Path:
    """The task directory under `cache_root`, written on first use and reused after.

    Written into a temporary sibling and renamed into place, so a crashed or concurrent
    run never leaves a half-written directory behind under the final name.
    """
    root = Path(cache_root)
    final = root / task_dir_name(cfg)
    if (final / "task.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".arith-tmp-", dir=root))
    try:
        write_task(tmp, cfg)
        os.rename(tmp, final)
    except OSError:
        if not (final / "task.json").is_file():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
