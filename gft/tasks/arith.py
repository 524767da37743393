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

Besides train / valid / test, the generator writes splits that measure generalisation and
robustness to bad demonstrations (SPLITS below says what each one measures):
  test_big      out of distribution: both operands above max_operand, numbers no training
                problem has; the same phrasings;
  test_chain    out of distribution: three operands and two operations ("What is 7 plus 5
                minus 3?"), while every training problem has two operands and one;
  test_reword   out of distribution, mildly: facts training teaches, asked in sentences and
                with names and nouns no training problem uses ("Ivy had 6 kites, then got 4
                more. Total?"): whether a method learned the question or its surface;
  train_flawed  training data whose expert demonstration is wrong (off by one, in the
                equation and the box alike) with probability `expert_error_rate`, otherwise
                the same rows as train.jsonl; train on it (gft reads train.jsonl: copy it
                there) and evaluate on the usual test splits.
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

GENERATOR_VERSION = 3  # bump when templates or sampling change: invalidates cached task dirs
PROMPT_SUFFIX = "\nA:"  # where the question ends and the answer begins

# Every split the generator writes, and what a model's accuracy on it measures.
SPLITS = {
    "train": "training rows: two operands in 0..max_operand, correct expert demonstrations",
    "valid": "held-out problems like test, for choosing settings (e.g. the learning rate)",
    "test": "in distribution: held-out (fact, phrasing) pairs whose facts train teaches "
            "under other phrasings: reading a new phrasing of a known sum",
    "test_big": "out of distribution, larger numbers: both operands in max_operand+1.."
                "2*max_operand+1, never in training: carrying the procedure to new numbers",
    "test_chain": "out of distribution, composition: three operands and two operations "
                  "(+/- only), while training has one: chaining steps training never chains",
    "test_reword": "out of distribution, mildly: facts training teaches, asked in sentence "
                   "forms and with names and nouns no training problem uses: whether the "
                   "method learned the question or the surface it was shown",
    "train_flawed": "training rows as in train, but each expert demonstration is wrong "
                    "(off by one) with probability expert_error_rate: robustness to "
                    "imperfect demonstrations (evaluate on the test splits)",
}
SPLIT_FILES = {name: f"{name}.jsonl" for name in SPLITS}
TEST_SPLITS = ("test", "test_big", "test_chain", "test_reword")

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
# test_reword's phrasings, names and nouns: none occurs in any training prompt. Each keeps
# one operation word training does use ("more", "plus", "away", "minus"), so the question
# is answerable by a model that reads for it, not only by one that matched the template.
REWORD_TEMPLATES = {
    "+": ("{name} had {a} {item}, then got {b} more. Total?",
          "{a} plus {b} gives what?"),
    "-": ("{name} had {a} {item}, then {b} ran away. How many stay?",
          "{a} minus {b} gives what?"),
    "*": ("{name} packed {a} boxes of {b} {item}. Total?",
          "{a} times {b} gives what?"),
}
REWORD_NAMES = ("Leo", "Ivy", "Kai", "Ada")
REWORD_ITEMS = ("kites", "cups", "hats", "shells")

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
    n_ood: int = field(default=100, metadata={
        "help": "Rows in each out-of-distribution test split (test_big, test_chain, test_reword)."})
    expert_error_rate: float = field(default=0.3, metadata={
        "help": "train_flawed only: probability that a row's expert demonstration is wrong."})


Problem = tuple[int, str, int, int]  # (a, op, b, template index)


def validate_config(cfg: ArithTaskConfig) -> None:
    """Raise ConfigError for a config that cannot produce the requested splits."""
    bad_ops = [op for op in cfg.ops if op not in TEMPLATES]
    if not cfg.ops or bad_ops:
        raise ConfigError(f"arith ops must be a non-empty subset of {sorted(TEMPLATES)}, got {cfg.ops!r}")
    if cfg.max_operand < 1:
        raise ConfigError(f"arith max_operand must be at least 1, got {cfg.max_operand}")
    for name in ("teacher_error_rate", "expert_error_rate"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"arith {name} must be in [0, 1], got {getattr(cfg, name)}")
    if min(cfg.n_train, cfg.n_valid, cfg.n_test, cfg.n_teacher, cfg.n_ood) < 0:
        raise ConfigError("arith n_train, n_valid, n_test, n_teacher and n_ood must be non-negative")
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
    """The rows of one split (a key of SPLITS), deterministic in cfg.

    Train cycles through its shuffled pool (reshuffled each pass) until n_train rows;
    valid and test have one row per held-out problem; test_big, test_chain and test_reword
    have up to n_ood rows each (fewer when the config allows fewer such problems).
    """
    if split not in SPLITS:
        raise ConfigError(f"arith split must be one of {sorted(SPLITS)}, got {split!r}")
    if split in ("train", "train_flawed"):
        return train_rows(cfg, flawed=split == "train_flawed")
    if split == "test_big":
        rng = random.Random(f"arith/{cfg.seed}/test_big")
        return [make_row(p, cfg, rng) for p in big_problems(cfg)]
    if split == "test_chain":
        rng = random.Random(f"arith/{cfg.seed}/test_chain")
        return [chain_row(p, rng) for p in chain_problems(cfg)]
    if split == "test_reword":
        rng = random.Random(f"arith/{cfg.seed}/test_reword")
        return [reword_row(p, rng) for p in reword_problems(cfg)]
    rng = random.Random(f"arith/{cfg.seed}/{split}")
    return [make_row(p, cfg, rng) for p in split_problems(cfg)[split]]


def train_order(cfg: ArithTaskConfig) -> tuple[list[Problem], random.Random]:
    """The n_train training problems in order, and the generator that then writes their rows."""
    pool = split_problems(cfg)["train"]
    rng = random.Random(f"arith/{cfg.seed}/train")
    if not pool and cfg.n_train:
        raise ConfigError("arith: every problem is held out; lower n_test/n_valid or raise max_operand")
    order: list[Problem] = []
    while len(order) < cfg.n_train:
        batch = list(pool)
        rng.shuffle(batch)
        order.extend(batch)
    return order[:cfg.n_train], rng


def train_rows(cfg: ArithTaskConfig, flawed: bool = False) -> list[dict]:
    """train.jsonl's rows; flawed: the same rows, but each expert demonstration is wrong
    (off by one, throughout) with probability expert_error_rate: only the flaw differs."""
    order, rng = train_order(cfg)
    rows = [make_row(p, cfg, rng) for p in order]
    if flawed:
        flaw = random.Random(f"arith/{cfg.seed}/train_flawed")
        for (a, op, b, _), row in zip(order, rows):
            if flaw.random() < cfg.expert_error_rate:
                row["completions"][0] = expert_solution(a, op, b, wrong_answer(APPLY[op](a, b), flaw))
    return rows


def big_problems(cfg: ArithTaskConfig) -> list[Problem]:
    """Up to n_ood problems whose operands both lie above the training range."""
    validate_config(cfg)
    r = range(cfg.max_operand + 1, 2 * cfg.max_operand + 2)
    facts = [(a, op, b) for op in cfg.ops for a in r for b in r if op != "-" or a >= b]
    return sample_problems(facts, cfg, "test_big", TEMPLATES)


def reword_problems(cfg: ArithTaskConfig) -> list[Problem]:
    """Up to n_ood distinct facts from the training range, each with a test_reword template
    (the index is into REWORD_TEMPLATES, not TEMPLATES)."""
    validate_config(cfg)
    return sample_problems(all_facts(cfg), cfg, "test_reword", REWORD_TEMPLATES)


def sample_problems(facts: list[tuple[int, str, int]], cfg: ArithTaskConfig, split: str,
                    templates: dict[str, tuple[str, ...]]) -> list[Problem]:
    """Up to n_ood of `facts` in a seeded shuffle, each with a random template index."""
    rng = random.Random(f"arith/{cfg.seed}/{split}/split")
    rng.shuffle(facts)
    return [(a, op, b, rng.randrange(len(templates[op]))) for a, op, b in facts[:cfg.n_ood]]


def reword_row(problem: Problem, rng: random.Random) -> dict:
    """A test_reword row: new wording, new names and nouns; the same demonstration styles."""
    a, op, b, t = problem
    c = APPLY[op](a, b)
    prompt = REWORD_TEMPLATES[op][t].format(a=a, b=b, name=rng.choice(REWORD_NAMES),
                                            item=rng.choice(REWORD_ITEMS))
    return {"prompt": prompt + PROMPT_SUFFIX, "answer": str(c), "completions": [expert_solution(a, op, b, c)]}


# Two-operation questions for test_chain, read left to right (so no '*': no precedence trap).
CHAIN_WORDS = {"+": "plus", "-": "minus"}
CHAIN_PHRASES = {"+": "gets {x} more", "-": "gives away {x}"}
CHAIN_TEMPLATES = ("What is {a} {w1} {b} {w2} {c}?",
                   "{name} has {a} {item}, {p1}, {p2}. How many now?")
ChainProblem = tuple[int, str, int, str, int, int]  # (a, op1, b, op2, c, template index)


def chain_problems(cfg: ArithTaskConfig) -> list[ChainProblem]:
    """Up to n_ood distinct three-operand problems with non-negative intermediate results,
    using the config's '+' and '-' (none when it has neither)."""
    validate_config(cfg)
    ops = [op for op in cfg.ops if op in CHAIN_WORDS]
    if not ops:  # e.g. ops=("*",): nothing to chain left to right; the split is empty
        return []
    rng = random.Random(f"arith/{cfg.seed}/test_chain/split")
    seen: dict[tuple, ChainProblem] = {}
    for _ in range(50 * cfg.n_ood):  # rejection sampling: the space is (max_operand+1)^3 * 4
        if len(seen) == cfg.n_ood:
            break
        a, b, c = (rng.randrange(cfg.max_operand + 1) for _ in range(3))
        o1, o2 = rng.choice(ops), rng.choice(ops)
        first = APPLY[o1](a, b)
        if first < 0 or APPLY[o2](first, c) < 0:
            continue
        seen.setdefault((a, o1, b, o2, c), (a, o1, b, o2, c, rng.randrange(len(CHAIN_TEMPLATES))))
    return list(seen.values())


def chain_row(problem: ChainProblem, rng: random.Random) -> dict:
    """A test_chain row: the question, the answer and the worked two-step demonstration."""
    a, o1, b, o2, c, t = problem
    first = APPLY[o1](a, b)
    result = APPLY[o2](first, c)
    prompt = CHAIN_TEMPLATES[t].format(
        a=a, b=b, c=c, w1=CHAIN_WORDS[o1], w2=CHAIN_WORDS[o2], name=rng.choice(NAMES),
        item=rng.choice(ITEMS), p1=CHAIN_PHRASES[o1].format(x=b), p2=CHAIN_PHRASES[o2].format(x=c))
    demo = f" {a}{o1}{b}={first}. {first}{o2}{c}={result}. \\boxed{{{result}}}"
    return {"prompt": prompt + PROMPT_SUFFIX, "answer": str(result), "completions": [demo]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, UTF-8, '\\n' endings."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def config_record(cfg: ArithTaskConfig) -> dict:
    """What task.json records: the generator version and the full config."""
    return {"task": "arith", "generator_version": GENERATOR_VERSION, "config": asdict(cfg)}


def write_task(directory: str | Path, cfg: ArithTaskConfig = ArithTaskConfig()) -> Path:
    """Write every split in SPLITS (<split>.jsonl) and task.json into `directory`."""
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
