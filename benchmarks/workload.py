"""The one workload every trainer runs: one prompt x 8 completions per step.

Equal work across trainers means the same model, the same prompt token ids (plain text,
no chat template: every trainer tokenizes it the same way), 8 sequences per update,
at most MAX_NEW_TOKENS new tokens, temperature 1.0, top-p 1.0, no top-k, beta = 0,
one optimizer update per step, no KL / reference model, no gradient checkpointing.

The reward is a cheap deterministic function of the completion text that varies from
completion to completion, so group advantages are non-zero and no trainer can skip the
update (a reward that is constant on a random model would zero every advantage).
Its signature suits all three trainers: gft (`path.py:function`, columns by name),
TRL (`prompts, completions, **kwargs`) and mlx-lm-lora (`prompts, completions, answer, types`).
"""
from __future__ import annotations

from pathlib import Path

GROUP = 8               # sequences per prompt and per update
MAX_NEW_TOKENS = 64     # completion length cap (FIELD-NOTES' baseline)
LEARNING_RATE = 1e-6
REWARD_SPEC = f"{Path(__file__).resolve()}:bench_reward"

# ~45 SmolLM2 tokens; an essay opening, so that most completions run to the cap.
PROMPT = ("The following is a long and detailed essay about the history of the Roman "
          "Empire, from the founding of the city to the fall of Constantinople, written "
          "for students of history.\n\nChapter 1. The founding of Rome\n\n")

# The K = 4 dataset responses of the `gft` preset: each longer than MAX_NEW_TOKENS
# tokens, so each is cut to the same length as a full-length rollout.
RESPONSES = [
    ("According to legend, Rome was founded in 753 BC by the twin brothers Romulus and "
     "Remus, who were raised by a she-wolf on the banks of the Tiber. The small "
     "settlement on the Palatine Hill grew into a city ruled by kings, then into a "
     "republic governed by elected magistrates and a senate of aristocrats. Over five "
     "centuries it conquered Italy, defeated Carthage and spread around the Mediterranean."),
    ("Historians trace the origins of Rome to a cluster of Iron Age villages on the hills "
     "above a ford of the Tiber river. Trade along the river and the salt road brought "
     "wealth, while contact with the Etruscans to the north and the Greek colonies to the "
     "south brought writing, engineering and religion. By the sixth century BC the "
     "villages had merged into a single city with walls, temples and a forum."),
    ("The early history of Rome is known mostly from later writers such as Livy, who "
     "mixed memory with myth. Archaeology shows huts on the Palatine from the ninth "
     "century BC, a drained marsh that became the Forum, and the first monumental "
     "buildings in the sixth century. The last king, Tarquin the Proud, was expelled in "
     "509 BC, and the Romans swore never again to be ruled by a king."),
    ("Rome began as a modest farming community, but its position was exceptional: a "
     "defensible group of hills, a river crossing, and fertile land in Latium. Its early "
     "institutions, the senate, the assemblies and the consuls, proved flexible enough to "
     "absorb conquered peoples as allies and citizens, and this talent for integration, "
     "more than military genius, explains how the city came to rule an empire."),
]


def bench_reward(prompts, completions, answer=None, types=None, **kwargs):
    """A varied, deterministic reward in [0, 1]: the completion's length mod 7, scaled."""
    return [float(len(c) % 7) / 6.0 for c in completions]


def mixed_responses() -> list[str]:
    """The mixed-length workload's K = 4 dataset responses: about 1/8, 1/4 and 1/2 of a
    response, and one longer than any cap (cut to MAX_NEW_TOKENS or --max-new-tokens) —
    GFT's short demonstrations beside full-length rollouts, the batches where padding to
    the longest sequence wastes most."""
    whole = " ".join(RESPONSES)
    return [RESPONSES[0][:len(RESPONSES[0]) // 8], RESPONSES[1][:len(RESPONSES[1]) // 4],
            RESPONSES[2][:len(RESPONSES[2]) // 2], (whole + " ") * 20]


def gft_row(mixed: bool = False) -> dict:
    """The single training row (gft's JSONL schema); mixed: mixed_responses()."""
    return {"prompt": PROMPT, "completions": mixed_responses() if mixed else RESPONSES,
            "answer": "753"}
