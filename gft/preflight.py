"""What a run checks before its first step, so that a mistake in the user's model, data,
rewards or config stops it in one line before any work (or is counted in a warning),
never hours in, never silently: rows that would train nothing, answers a reward needs,
sequences past what the model can take, token ids past its embedding, a changed dtype,
the memory plan, the launcher. gft/run.py calls these; they read, and change nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from gft.backend import provider
from gft.config import TrainConfig
from gft.distributed import Comm, MLXComm
from gft.errors import ConfigError, DataError
from gft.loop import LoopState
from gft.modelfiles import stored_dtype
from gft.rewards import parse_reward_specs
from gft.rollout import PreparedPrompts, check_context, encode_response
from gft.stages import plan_stages
from gft.types import Example


def rows_with_long_responses(cfg: TrainConfig, rows: list[Example], tokenizer
                             ) -> tuple[list[Example], int]:
    """(rows with a dataset response longer than a stage's max_response_tokens with its
    EOS, the smallest such limit that cuts one): of the num_offpolicy responses that
    enter that stage's groups. gft/rollout.py cuts them there, so the model learns them
    without their end, and never to stop. Counted once, before training, as over-long
    prompts are."""
    stages = [s.cfg for s in plan_stages(cfg, 1) if s.cfg.num_offpolicy > 0]
    k = max((s.num_offpolicy for s in stages), default=0)
    texts = [(i, j, text) for i, ex in enumerate(rows) for j, text in enumerate(ex.responses[:k])]
    if not texts:
        return [], cfg.max_response_tokens
    lengths = tokenizer([text for *_, text in texts], add_special_tokens=False).input_ids
    long, limits = set(), []
    for s in stages:
        cut = {i for (i, j, _), ids in zip(texts, lengths)
               if j < s.num_offpolicy and len(ids) + 1 > s.max_response_tokens}
        long |= cut
        limits += [s.max_response_tokens] if cut else []
    return [rows[i] for i in sorted(long)], min(limits, default=cfg.max_response_tokens)


def shared_prompts(train_rows: list[Example], eval_rows: list[Example]) -> list[Example]:
    """Held-out rows whose prompt is also a training row's: eval_split: train, eval_data
    naming the training file, or duplicates across a data set's splits. Evaluating them
    measures memory, not generalisation, so the run says how many there are."""
    def key(example: Example) -> str:
        return json.dumps(example.prompt, sort_keys=True)
    trained = {key(example) for example in train_rows}
    return [example for example in eval_rows if key(example) in trained]


def rewards_needed(cfg: TrainConfig) -> bool:
    """Whether some stage's advantage depends on rewards: it samples rollouts or compares
    responses (any estimator but constant). SFT and DFT alone do not."""
    stages = plan_stages(cfg, 1)  # the step counts do not matter here, only the presets
    return any(s.cfg.num_rollouts > 0 or s.cfg.advantage != "constant" for s in stages)


def check_trainable(cfg: TrainConfig, rows: list[Example], console: Console) -> None:
    """A stage with no rollouts (sft, dft: n = 0) learns only from the rows' responses; if
    no row has one it would make zero updates and still write final/: an error. If only
    some rows lack one, they are drawn into steps and train nothing: a warning that counts
    them (no row is left out silently). Likewise rows whose group is one dataset response
    under an advantage that compares responses, and empty dataset responses (trained as
    EOS alone). Said before the model loads."""
    empty = _rows_with_empty_responses(cfg, rows)
    if empty:
        console.print(f"[yellow]warning: {len(empty)} of {len(rows)} training rows have an empty "
                      f"(or whitespace-only) dataset response (the first: {empty[0].source}); "
                      "trained on, it teaches the model to end its answer at once",
                      highlight=False)
    _check_groups_of_one(cfg, rows, console)
    _check_system_column(rows, console)
    without = [ex for ex in rows if not ex.responses]
    if not without:
        return
    for stage in plan_stages(cfg, 1):
        if stage.cfg.num_rollouts == 0:
            where = f"stage {stage.index + 1} ({stage.name})" if cfg.stages else \
                f"preset '{stage.name}'"
            if len(without) < len(rows):
                console.print(f"[yellow]warning: {len(without)} of {len(rows)} training rows "
                              f"have no response (the first: {without[0].source}); {where} "
                              "has num_rollouts=0 and learns nothing from them",
                              highlight=False)
                return
            raise DataError(f"no training row has a response (completion, completions, "
                            f"responses or a final assistant message), and {where} has "
                            "num_rollouts=0: it learns only from dataset responses. Add "
                            "responses, or use a preset that samples rollouts (grpo, gft)",
                            path=str(cfg.data))


def _check_system_column(rows: list[Example], console: Console) -> None:
    """mlx-lm-lora's GRPO data holds {"prompt", "answer", "system"} and puts `system` in
    the prompt as a system turn; gft, as TRL, passes such a column to reward functions
    only: counted in a warning, so that the system prompt is not dropped in silence."""
    loose = [ex for ex in rows if isinstance(ex.prompt, str)
             and isinstance(ex.columns.get("system"), str) and ex.columns["system"].strip()]
    if loose:
        console.print(f"[yellow]warning: {len(loose)} of {len(rows)} training rows have a "
                      f"'system' column beside a text prompt (the first: {loose[0].source}); "
                      "it is not in the prompt (mlx-lm-lora's GRPO data puts it there), only "
                      "passed to reward functions: to prompt with it, write the prompt as "
                      'chat messages [{"role": "system", ...}, {"role": "user", ...}]',
                      highlight=False)


def _check_groups_of_one(cfg: TrainConfig, rows: list[Example], console: Console) -> None:
    """A stage without rollouts whose advantage compares responses (gft with
    num_rollouts: 0) builds each row's group from its dataset responses alone; a row with
    fewer than two has a group of one, no baseline, and trains nothing. All rows: an
    error (the run would make no update); some: counted in a warning."""
    for stage in plan_stages(cfg, 1):
        c = stage.cfg
        if c.num_rollouts or c.advantage == "constant":
            continue
        alone = [ex for ex in rows if min(len(ex.responses), c.num_offpolicy) < 2]
        if not alone:
            continue
        where = f"stage {stage.index + 1} ({stage.name})" if cfg.stages else \
            f"preset '{stage.name}'"
        why = (f"{where} has num_rollouts=0 and advantage '{c.advantage}', which compares "
               "the responses of a row's group: a group of one has no baseline")
        if len(alone) < len(rows):
            console.print(f"[yellow]warning: {len(alone)} of {len(rows)} training rows have "
                          f"fewer than two dataset responses (the first: {alone[0].source}); "
                          f"{why}, so they train nothing", highlight=False)
            return
        raise DataError(f"no training row has two dataset responses, and {why}: the run "
                        "would train nothing. Sample rollouts (num_rollouts >= 1), give rows "
                        "more responses, or use advantage: constant (sft, dft)",
                        path=str(cfg.data))


def _rows_with_empty_responses(cfg: TrainConfig, rows: list[Example]) -> list[Example]:
    """Rows with a response that some stage's group takes (one of its num_offpolicy) and
    that is "" or whitespace (a JSON "", a cell of spaces): trained as its EOS alone."""
    k = max((s.cfg.num_offpolicy for s in plan_stages(cfg, 1)), default=0)
    return [ex for ex in rows if any(not text.strip() for text in ex.responses[:k])]


def check_answers(cfg: TrainConfig, parts: list[PreparedPrompts | None]) -> None:
    """Every row needs `answer` when a built-in reward compares with it; say so before
    training, not when a step first draws the row hours into the run."""
    needs = []
    raw = cfg.rewards if cfg.rewards is not None else (["math"] if rewards_needed(cfg) else [])
    for spec in parse_reward_specs(raw) if raw else []:
        pattern = spec.options.get("pattern")
        if spec.name in ("math", "exact") or (
                spec.name == "regex" and isinstance(pattern, str) and "(?P<answer>" in pattern):
            needs.append(spec.name)
    if not needs:
        return
    for part in parts:
        for ex in part.rows if part is not None else []:
            if ex.answer is None:
                raise DataError(f"missing; reward '{needs[0]}' compares every response with the "
                                "row's answer (add one, or choose rewards that need none)"
                                + _answer_hint(cfg.answer_column, ex),
                                path=ex.source, field=cfg.answer_column)


# Where data sets commonly keep the ground truth under another name (TRL's math data sets:
# solution; others: ground_truth, label, target, final_answer, gold, reference).
_ANSWER_NAMES = ("solution", "ground_truth", "final_answer", "gold", "label", "target",
                 "reference", "answers")


def _answer_hint(column: str, ex: Example) -> str:
    """"; this row has a 'solution' column: set answer_column: solution ..." when the row
    has a column by a name data sets often keep the ground truth under."""
    if column in ex.columns and ex.columns[column] is None:
        return ""  # the column is there, this row's cell is empty
    found = [name for name in _ANSWER_NAMES if ex.columns.get(name) is not None]
    return (f"; this row has a '{found[0]}' column: set answer_column: {found[0]} if it holds "
            "the ground truth" if found else "")


def check_sequences_fit(backend, data: PreparedPrompts, held_out: PreparedPrompts | None,
                        stages, scorer) -> None:
    """The longest sequence the run can build must fit a model with learned positions
    (gft.rollout.check_context): longest prompt + max_response_tokens where anything is
    sampled (rollouts, a held-out evaluation with rewards), else each row's prompt + its
    longest dataset response as the run cuts it (an SFT run of short demonstrations on
    GPT-2 fits, and so does one whose long prompts have short answers)."""
    if backend.max_positions is None:
        return
    cap = max(stage.cfg.max_response_tokens for stage in stages)
    prompts = data.prompt_ids + (held_out.prompt_ids if held_out else [])
    samples = any(stage.cfg.num_rollouts > 0 for stage in stages) or \
        (held_out is not None and scorer is not None)
    if samples:
        check_context(backend.max_positions, prompts, cap, "max_response_tokens",
                      reason=backend.positions_reason)
        return
    rows = data.rows + (held_out.rows if held_out else [])
    response = [max((len(encode_response(text, backend.tokenizer, cap)[0])
                     for text in row.responses), default=0) for row in rows]
    row = max(range(len(rows)), key=lambda i: len(prompts[i]) + response[i], default=None)
    if row is not None:
        check_context(backend.max_positions, [prompts[row]], response[row],
                      "max_response_tokens", "its dataset response", backend.positions_reason)


def dtype_note(cfg: TrainConfig, model_path: str) -> str | None:
    """One line when the user's weights are stored in another dtype than the run trains
    and saves them in (a bfloat16 model trained at the default dtype: float32 comes back,
    twice the size), so that a change of the user's model is never silent."""
    from gft.lora import is_mlx_adapter, is_peft_adapter
    if cfg.lora_rank or is_peft_adapter(model_path) or is_mlx_adapter(model_path) \
            or not Path(model_path).is_dir():
        return None  # LoRA saves only its adapters; the base is not written
    stored = stored_dtype(Path(model_path))
    if stored is None or stored == cfg.dtype:
        return None
    keep = (f"set dtype: {stored} to keep {stored}" if stored in ("float32", "bfloat16")
            else f"gft trains in float32 or bfloat16, not {stored}")
    return (f"note: {model_path} is stored in {stored}; this run trains and saves it in "
            f"{cfg.dtype} (dtype: {cfg.dtype}); {keep}")


def memory_plan(cfg: TrainConfig, model_path: str | None = None):
    """The run's gft.plan.MemoryPlan on its device, or None when the model's config.json
    is not on disk (a hub id)."""
    from gft.plan import model_config, plan
    config = model_config(cfg, model_path)
    if config is None:
        return None
    chosen = provider()
    available, device = chosen.available_memory(cfg.backend, cfg.device)
    return plan(config, cfg, backend=chosen.resolve_backend_name(cfg.backend),
                available=available, device=device)


def check_memory(cfg: TrainConfig, model_path: str) -> None:
    """Refuse, before loading, a run whose planned peak exceeds the device's memory."""
    if not cfg.check_memory:
        return
    from gft.plan import refusal
    try:
        p = memory_plan(cfg, model_path)
    except ConfigError:
        # sizes the plan cannot read (an architecture it does not know, a broken
        # config.json): no plan, not a refusal; loading the model judges the directory
        return
    if p is not None and not p.fits():
        raise ConfigError(refusal(p))


def nothing_to_train(stages, state: LoopState) -> str:
    """Why a resumed run has no step left, and the key that gives it more: without this,
    resuming a finished run loaded the model, trained nothing and re-exported final/."""
    end = stages[-1].end
    if state.step < end:
        return ("nothing to train: the run has spent its max_policy_tokens budget; raise "
                "max_policy_tokens to train longer")
    return (f"nothing to train: the run has done {state.step} steps of its {end}; raise "
            f"max_steps to train longer (e.g. --set max_steps={state.step + 100})")


def check_launcher(cfg: TrainConfig, comm: Comm) -> None:
    """torchrun starts torch ranks and mlx.launch MLX ranks; the other mix cannot work."""
    if comm.world == 1:
        return
    want = "mlx" if isinstance(comm, MLXComm) else "torch"
    if cfg.backend != want:
        launcher = "mlx.launch" if want == "mlx" else "torchrun"
        raise ConfigError(f"started by {launcher} with {comm.world} processes, but backend is "
                          f"'{cfg.backend}'; use --backend {want}")
