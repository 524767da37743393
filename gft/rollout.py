"""From prompts to scored, advantaged groups: the host-side half of a GFT step.

    prompts -> backend.generate (n rollouts each) -> decode
            -> rewards for rollouts AND dataset responses (demonstrations are scored too,
               not assumed correct)
            -> groups of K + n -> group-relative advantages
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gft.prompts import render_prompt
from gft.errors import ConfigError, DataError
from gft.groups import Sequence_
from gft.objective import group_advantages
from gft.stops import Stops
from gft.types import Example


@dataclass
class PreparedPrompts:
    """Training rows with their prompts tokenized once, and what was done to long ones."""
    rows: list[Example]
    prompt_ids: list[list[int]]
    n_truncated: int = 0
    n_skipped: int = 0


def encode_prompt(example: Example, tokenizer, chat_template: bool | None) -> list[int]:
    """Token ids of the rendered prompt. A chat template already holds the special tokens
    (BOS, role markers), so only plain prompts get the tokenizer's own special tokens."""
    text = render_prompt(example, tokenizer, chat_template=chat_template)
    templated = isinstance(example.prompt, list) or (chat_template and tokenizer.chat_template)
    ids = tokenizer(text, add_special_tokens=not templated).input_ids
    # a tokenizer that ends every text with EOS (add_eos_token, a post-processor) would
    # end the prompt there, and the response would follow an EOS: the prompt keeps only
    # the special tokens that start a text
    if not templated and appends_eos(tokenizer) and ids[-1:] == [tokenizer.eos_token_id]:
        ids = ids[:-1]
    return ids


@functools.lru_cache(maxsize=8)
def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer's special tokens end a text with EOS: asked of a text, not of
    "", which a tokenizer whose BOS is its EOS also encodes as [EOS] (at the start)."""
    eos = tokenizer.eos_token_id
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return plain[-1:] != [eos] and tokenizer("a").input_ids[-1:] == [eos]


def prepare_prompts(rows: Sequence[Example], tokenizer, *, chat_template: bool | None,
                    max_prompt_tokens: int, overflow: str) -> PreparedPrompts:
    """Tokenize every prompt once; apply the long-prompt policy (error|truncate|skip)."""
    out = PreparedPrompts([], [])
    for ex in rows:
        ids = encode_prompt(ex, tokenizer, chat_template)
        if len(ids) > max_prompt_tokens:
            if overflow == "error":
                raise DataError(f"prompt has {len(ids)} tokens, more than max_prompt_tokens="
                                f"{max_prompt_tokens} (set prompt_overflow: truncate or skip)",
                                path=ex.source, field="prompt")
            if overflow == "skip":
                out.n_skipped += 1
                continue
            ids = ids[-max_prompt_tokens:]  # keep the end: the question sits there
            out.n_truncated += 1
        out.rows.append(ex)
        out.prompt_ids.append(ids)
    return out


def encode_response(text: str, tokenizer, max_tokens: int) -> tuple[list[int], bool]:
    """A dataset response as ids + EOS (so the model learns to stop); cut at max_tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return (ids[:max_tokens], True) if len(ids) > max_tokens else (ids, False)


def check_context(max_positions: int | None, prompt_ids: Sequence[list[int]],
                  response_tokens: int, key: str, what: str | None = None,
                  reason: str | None = None) -> None:
    """Refuse, before any work, sequences longer than a model with learned absolute
    positions has positions for (GPT-2's wpe, OPT's embed_positions: max_positions, from
    the backend; None for RoPE or ALiBi, which have no such wall). Past it the forward
    indexes beyond the table: an IndexError deep in torch, possibly hours into a run.
    response_tokens: the most response tokens after the longest prompt, `what` they are
    (default: `key`); key: the option or config key that bounds them, named in the error;
    reason: what sets max_positions when it is not learned positions (the backend's
    positions_reason: MLX over a sliding window mlx-lm does not apply)."""
    if max_positions is None or not prompt_ids:
        return
    longest = max(len(p) for p in prompt_ids)
    if longest + response_tokens <= max_positions:
        return
    fix = (f"lower {key} to at most {max_positions - longest}" if longest < max_positions
           else "shorten the prompts (max_prompt_tokens, prompt_overflow: truncate)")
    reason = reason or (f"the model has learned positions for {max_positions} tokens "
                        "(config.json max_position_embeddings or n_positions)")
    raise ConfigError(f"{reason}, but the longest prompt "
                      f"({longest} tokens) plus {what or key} ({response_tokens} tokens) reaches "
                      f"{longest + response_tokens}, past {max_positions}; {fix}")


def check_token_ids(vocab_rows: int | None, tokenizer, parts: Sequence[PreparedPrompts | None],
                    max_response_tokens: int, model: str) -> None:
    """Every token id the run feeds the model must have an embedding row. A tokenizer
    with tokens added after the model was saved (chat markers, without
    resize_token_embeddings) would otherwise fail as an IndexError deep in the forward.
    The data is scanned only when the tokenizer is larger than the embedding."""
    if vocab_rows is None or len(tokenizer) <= vocab_rows:
        return
    def first_bad(ids: Sequence[int]) -> int | None:
        return next((i for i in ids if i >= vocab_rows), None)
    for part in parts:
        for ex, ids in zip(part.rows, part.prompt_ids) if part is not None else ():
            found = [("prompt", first_bad(ids))] + [
                ("completions", first_bad(encode_response(text, tokenizer, max_response_tokens)[0]))
                for text in ex.responses]
            for field, bad in found:
                if bad is not None:
                    raise DataError(
                        f"token id {bad} ({tokenizer.convert_ids_to_tokens(bad)!r}) is past the "
                        f"{vocab_rows} embedding rows of {model}: the tokenizer has "
                        f"{len(tokenizer)} tokens, more than the model was saved with; "
                        "resize the model's embeddings to the tokenizer "
                        "(model.resize_token_embeddings(len(tokenizer))) and save it again",
                        path=ex.source, field=field)


def build_groups(rows: Sequence[Example], prompt_ids: Sequence[list[int]],
                 rollouts: Sequence[list[int]], *, tokenizer, num_offpolicy: int,
                 num_rollouts: int, max_response_tokens: int,
                 stops: Stops | None = None) -> list[Sequence_]:
    """K dataset responses then n rollouts per prompt; rollouts are prompt-major.
    A rollout is truncated when no stop (`stops`, default the tokenizer's EOS) ended it."""
    stops = stops if stops is not None else Stops(frozenset({tokenizer.eos_token_id}))
    seqs: list[Sequence_] = []
    for g, (ex, pids) in enumerate(zip(rows, prompt_ids)):
        for text in ex.responses[:num_offpolicy]:
            ids, cut = encode_response(text, tokenizer, max_response_tokens)
            seqs.append(Sequence_(g, pids, ids, text, on_policy=False, truncated=cut))
        for ids in rollouts[g * num_rollouts:(g + 1) * num_rollouts]:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            ended = stops.ended(ids, tokenizer.decode)
            seqs.append(Sequence_(g, pids, list(ids), text, on_policy=True, truncated=not ended))
    return seqs


def score_groups(seqs: list[Sequence_], rows: Sequence[Example], scorer,
                 advantage: str, trainer_state=None) -> dict[str, Any]:
    """Rewards for every response, then advantages within each group (in place).

    Reward functions see each row's prompt as written (a chat keeps its system turn) and
    each response's token ids. Without a scorer (SFT/DFT with no rewards configured)
    every reward is 0 and only the constant advantage makes sense."""
    if not seqs:
        return {}
    groups = np.array([s.group for s in seqs])
    on_policy = np.array([s.on_policy for s in seqs], dtype=bool)
    logged, extra = {}, {}
    if scorer is None:
        total, correct, per_function = np.zeros(len(seqs)), np.zeros(len(seqs), bool), None
    else:
        result = scorer.score([rows[s.group].prompt for s in seqs], [s.text for s in seqs],
                              reward_columns([rows[s.group] for s in seqs]),
                              sources=[rows[s.group].source for s in seqs],
                              completion_ids=[s.response_ids for s in seqs],
                              trainer_state=trainer_state)
        total, correct = result.total, result.correct
        per_function = list(result.per_function.values())
        # what the functions passed to TRL's log_metric / log_extra (gft/rewards.py)
        logged, extra = getattr(result, "logged", {}), getattr(result, "extra", {})
    adv = group_advantages(total, groups, advantage)
    for s, r, c, a in zip(seqs, total, correct, adv):
        s.reward, s.correct, s.advantage = float(r), bool(c), float(a)
    return {"rewards": total, "groups": groups, "advantages": adv,
            "per_function": per_function, "on_policy": on_policy,
            "logged": logged, "extra": extra}


def reward_columns(rows: Sequence[Example]) -> dict[str, list]:
    """`answer` and every other data column, one value per row (None where absent)."""
    columns: dict[str, list] = {"answer": [row.answer for row in rows]}
    for key in sorted({k for row in rows for k in row.columns}):
        columns[key] = [row.columns.get(key) for row in rows]
    return columns
