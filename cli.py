"""The `gft` command: train, generate, eval, plot, convert, fuse, env. It only parses and
dispatches, and wires the program together: importing `backends` registers the torch/mlx
provider with gft.backend, through which gft/run.py loads the chosen backend."""
from __future__ import annotations

import functools
import importlib.metadata
import json
import platform
import sys
from typing import Any

import click

import backends  # noqa: F401  (registers itself as gft.backend's provider; imports no framework)
from gft.errors import GFTError
from gft.signals import Interrupted

EXIT_USER_ERROR = 2


def friendly_errors(fn):
    """User mistakes print one line and exit 2 instead of a traceback; a file system
    failure (a full disk) prints one line and exits 1; a run stopped by SIGINT/SIGTERM
    says how to resume and exits 128 + the signal number (130, 143)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(_rank_prefix() + str(e), err=True)
            _exit(e.exit_code)
        except GFTError as e:
            click.echo(f"error: {_rank_prefix()}{e}", err=True)
            _exit(getattr(e, "exit_code", EXIT_USER_ERROR))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {_rank_prefix()}{e.strerror or e}{where}", err=True)
            _exit(1)
    return wrapper


def _exit(code: int) -> None:
    """sys.exit; under torchrun with several ranks the rank ends at once instead (stdio
    flushed): interpreter teardown with gloo's threads alive aborted a rank in some runs
    ("terminate called without an active exception", SIGABRT), and torchrun then
    reported that in place of the error every rank had agreed on and printed (as a
    finished rank does, gft.distributed.shutdown)."""
    import os
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _rank_prefix() -> str:
    """Under torchrun / mlx.launch every rank reports its own error: say which one."""
    import os
    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 \
        else os.environ.get("MLX_RANK")
    return f"[rank {rank}] " if rank is not None else ""


SEED = click.IntRange(0, 2**63 - 1)  # numpy's and torch's seeds


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (click's lets them through)."""
    name = "finite float range"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        import math
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class OneLineErrors(click.Group):
    """click's own usage errors (a bad option value, a missing argument) as one line,
    `error: ...`, exit 2, like every other gft error, instead of usage + hint + error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.pop("standalone_mode", True)
        if not standalone:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} -h)" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)


def _non_empty(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]):
    """Every --prompt has text: an empty prompt has no token to continue from."""
    for i, value in enumerate(values):
        if not value.strip():
            raise click.BadParameter(f"prompt {i + 1} is empty; give some text to continue",
                                     ctx=ctx, param=param)
    return values


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
# looked up when --version is asked for: `python cli.py` from a checkout runs uninstalled
@click.version_option(package_name="gft", prog_name="gft")
def main() -> None:
    """gft: Group Fine-Tuning for causal language models (SFT, DFT, GRPO and GFT as presets
    of one objective) on PyTorch and MLX, with portable Hugging Face-layout checkpoints.

    Run `gft train` with no arguments for the embedded offline default job."""


def _config_help() -> str:
    from gft.config import config_help
    return config_help()


@main.command(context_settings={"max_content_width": 100})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--preset", type=click.Choice(["gft", "sft", "dft", "grpo"]),
              help="Objective preset (docs/ALGORITHM.md's table). Default: gft.")
@click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]),
              help="auto = mlx on Apple silicon, torch elsewhere.")
@click.option("--model", help="Model directory, hub id, or LoRA adapter (PEFT or mlx-lm) to "
              "train on from (default: the embedded tiny model).")
@click.option("--data", help="JSONL file or data directory (default: the embedded task).")
@click.option("--output-dir", "-o", help="Run directory (default: runs/<preset>-<time>).")
@click.option("--max-steps", type=click.IntRange(1), help="Number of training steps.")
@click.option("--seed", type=SEED, help="Random seed.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False),
              help="Continue the run in this directory from its latest checkpoint.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable), e.g. --set tau=0.2.")
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
              help="Data-parallel processes on this machine (torch): starts torchrun "
                   "--nproc-per-node N with the same arguments. See README 'Training on many GPUs'.")
@click.option("--help-config", is_flag=True, help="List every config key with its help.")
@click.option("--dry-run", is_flag=True,
              help="Print the memory plan (weights, adapters or gradients, AdamW moments, "
                   "activations, logits, KV cache, available memory) and exit; nothing is "
                   "loaded. Exit 2 when it cannot fit.")
@friendly_errors
def train(config: str | None, preset: str | None, backend: str | None, model: str | None,
          data: str | None, output_dir: str | None, max_steps: int | None, seed: int | None,
          resume: str | None, sets: tuple[str, ...], nproc: int, help_config: bool,
          dry_run: bool) -> None:
    """Fine-tune a model. CONFIG is an optional YAML file of config keys; options and --set
    override it. With nothing given, trains the embedded default: a tiny model on bundled
    arithmetic word problems, offline, on CPU, in a few minutes."""
    if help_config:
        click.echo("Config keys (YAML or --set KEY=VALUE):\n" + _config_help())
        return
    if nproc > 1:
        sys.exit(_torchrun(nproc))
    from gft.config import build_config
    from gft.yamlconfig import parse_override, read_yaml
    from gft.run import run_training
    overrides = dict(parse_override(s) for s in sets)
    named = {"preset": preset, "backend": backend, "model": model, "data": data,
             "output_dir": output_dir, "max_steps": max_steps, "seed": seed}
    overrides.update({k: v for k, v in named.items() if v is not None})
    if resume:
        if dry_run:
            raise click.UsageError("--dry-run plans a new run; run it without --resume")
        if config:
            raise click.UsageError("--resume takes the run's saved config; pass changes with --set")
        run_training(None, resume=resume, overrides=overrides)  # type: ignore[arg-type]
        return
    yaml_values = read_yaml(config) if config else {}
    cfg = build_config(yaml_values, overrides, source=config or "config")
    if dry_run:
        return _dry_run(cfg)
    run_training(cfg)


def _dry_run(cfg) -> None:
    from gft.errors import ConfigError
    from gft.plan import describe, refusal
    from gft.preflight import memory_plan
    plan = memory_plan(cfg)
    if plan is None:
        raise ConfigError(f"{cfg.model}: no local config.json to plan from (a hub id); "
                          "download the model first")
    for line in describe(plan):
        click.echo(line)
    if not plan.fits():
        raise ConfigError(refusal(plan))


def _torchrun(nproc: int) -> int:
    """Run this same `gft train` command line under torchrun with nproc processes; returns
    the exit code of the first rank that failed (each rank prints its own one-line error,
    so torchrun's own traceback is not shown)."""
    import logging
    import os
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args, skip = [], False
    for a in sys.argv[2:]:  # argv: gft train ...
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    # torchrun sets 1 thread per process (with a warning) when unset; share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "gft", "train", *args]))
    except ChildFailedError as e:
        return next((f.exitcode for f in e.failures.values() if f.exitcode), 1)
    return 0


def _sampling_options(fn):
    for opt in reversed([
        click.option("--backend", type=click.Choice(["auto", "torch", "mlx"]), default="auto",
                     show_default=True),
        click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
                     show_default=True),
        click.option("--seed", type=SEED, default=0, show_default=True),
        click.option("--base", help="A LoRA checkpoint's base model (default: the one its "
                                    "adapter_config.json names)."),
        click.option("--stop", "stop", multiple=True, metavar="TEXT",
                     help="Also end a completion at this string (repeatable; a number "
                          "is a token id). The tokenizer's EOS and every eos_token_id in "
                          "generation_config.json always end it."),
        click.option("--system-prompt", help="A system message put first in each prompt "
                                             "without one (default: the one a gft run's "
                                             "model was trained with; \"\" for none; none "
                                             "with --no-chat-template)."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@click.argument("model")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, callback=_non_empty,
              help="Prompt text (repeatable); - reads it from standard input (as mlx-lm's "
                   "generate does); a JSON list of chat messages, "
                   "'[{\"role\": \"user\", \"content\": \"...\"}]', is rendered with the "
                   "chat template (a system turn, a few-shot exchange, an assistant prefill).")
@click.option("--num", "-n", type=click.IntRange(1), default=1, show_default=True,
              help="Completions per prompt.")
@click.option("--temperature", type=FiniteRange(0.0), default=0.0, show_default=True,
              help="0 = greedy decoding (as mlx-lm's generate; a generation_config.json "
                   "asking for sampling is named in a note with the options that follow it).")
@click.option("--top-p", type=FiniteRange(0.0, 1.0, min_open=True), default=1.0,
              show_default=True)
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap each prompt as a user message in the tokenizer's chat template. "
                   "Default: as the model was trained when MODEL is a gft checkpoint (its "
                   "chat_template key), else on when the tokenizer has a template.")
@_sampling_options
@friendly_errors
def generate(model: str, prompts: tuple[str, ...], num: int, temperature: float, top_p: float,
             chat_template: bool | None, backend: str, max_new_tokens: int, dtype: str,
             seed: int, base: str | None, stop: tuple[str, ...],
             system_prompt: str | None) -> None:
    """Sample completions from MODEL (a directory, e.g. a run's final/ checkpoint, or a
    Hugging Face Hub id)."""
    from backends import SamplingConfig
    from gft.rollout import PreparedPrompts, check_context, check_token_ids, encode_prompt
    from gft.trained import generate_chat_template
    from gft.prompts import with_system_prompt
    from gft.trained import system_prompt_for
    examples = [_prompt_example(p, i) for i, p in enumerate(prompts)]  # before any loading
    model = _local_model(model)
    examples = with_system_prompt(examples, system_prompt_for(model, system_prompt,
                                                               chat_template))
    ctx = click.get_current_context()
    if all(ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT
           for name in ("temperature", "top_p")):  # greedy, whatever the model's file asks
        from gft.trained import sampling_note
        note = sampling_note(_generation_config_dir(model, base))
        if note:
            click.echo(note, err=True)
    be = _sampler(backend, model, dtype, base, stop)
    if chat_template is None:
        chat_template = generate_chat_template(model, be.tokenizer)
    once = [encode_prompt(ex, be.tokenizer, chat_template) for ex in examples]
    check_context(be.max_positions, once, max_new_tokens, "--max-new-tokens",
                  reason=be.positions_reason)
    check_token_ids(be.vocab_rows, be.tokenizer, [PreparedPrompts(examples, once)],
                    max_new_tokens, model)
    ids = [p for p in once for _ in range(num)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                              top_p=top_p, greedy=temperature == 0.0)
    for prompt_ids, out in zip(ids, be.generate(ids, sampling, seed)):
        click.echo(be.tokenizer.decode(out, skip_special_tokens=True))


def _generation_config_dir(model: str, base: str | None) -> str:
    """The folder whose generation_config.json applies to MODEL: its own, or for a LoRA
    adapter (which has none) its base's on this machine, as transformers and mlx-lm read it."""
    from pathlib import Path
    from gft.errors import GFTError
    from gft.lora import is_mlx_adapter, is_peft_adapter
    if (Path(model) / "generation_config.json").is_file() or not (
            is_peft_adapter(model) or is_mlx_adapter(model)):
        return model
    if base is None:
        from gft.convert import read_adapter_base
        from gft.runpaths import adapter_base
        try:
            named = read_adapter_base(Path(model))
        except GFTError:
            return model  # loading it names the problem
        base = adapter_base(named, Path(model)) if named else model
    return base


def _local_model(model: str) -> str:
    """MODEL (or a LoRA adapter's base) as a folder on this machine: a Hub id's snapshot
    (gft/hubmodel.py), so that its gft.json and generation_config.json (the eos ids that
    end completions) are read as a local folder's are, on either backend."""
    from gft.hubmodel import local_model
    return local_model(model)


def _prompt_example(text: str, index: int):
    """One --prompt as an Example: standard input for "-"; a JSON list of objects is chat
    messages (checked as a data row's are), any other text a plain prompt, "[INST] ..."
    included."""
    from gft.data import example_from_row
    from gft.errors import DataError
    from gft.types import Example
    source = f"-p {index + 1}"
    if text == "-":
        text = click.get_text_stream("stdin").read()
        if not text.strip():
            raise DataError("standard input is empty; give some text to continue", path=source)
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            return example_from_row({"prompt": value}, path="--prompt", line=index + 1)
    return Example(text, source=source)


def _sampler(backend: str, model: str, dtype: str, base: str | None, stop: tuple[str, ...]):
    """The backend `gft generate` and `gft eval` sample from. --base names a LoRA
    adapter's base: given with a model that is no adapter it would be ignored, and the
    user would not be sampling what they think, so it is refused. A gft run's model ends
    completions where its run's rollouts and evaluation did (its `stop`, gft.json), and
    at every --stop besides."""
    from backends import load_backend
    from gft.errors import ConfigError
    from gft.lora import is_mlx_adapter, is_peft_adapter
    from gft.trained import trained_stop
    if base is not None and not (is_peft_adapter(model) or is_mlx_adapter(model)):
        raise ConfigError(f"--base {base}: {model} is a model, not a LoRA adapter; --base "
                          "names the base model under an adapter")
    trained = trained_stop(model)
    stops = trained + [s for s in _stop_values(stop) if s not in trained]
    if base is None:  # an adapter's base named by Hub id, as most are (PEFT, mlx-lm)
        from gft.hubmodel import adapter_hub_base
        base = adapter_hub_base(model)
    return load_backend(backend, model, dtype=dtype, base=base and _local_model(base),
                        stop=stops, train=False)


def _stop_values(stop: tuple[str, ...]) -> list[int | str]:
    """--stop values: a number is a token id, anything else a string."""
    return [int(s) if s.isdigit() else s for s in stop]


@main.command(name="eval")
@click.argument("model")
@click.option("--data", help="Data file, directory or Hub id (default: when MODEL is a gft "
              "run's final/ or checkpoint in its run directory, the data its run evaluated "
              "on; else the embedded task).")
@click.option("--split", default="test", show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Evaluate only the first N rows.")
@click.option("-k", "k", type=click.IntRange(1), default=1, show_default=True,
              help="Also sample k completions per prompt and report pass@k.")
@click.option("--temperature", type=FiniteRange(0.0, min_open=True), default=1.0,
              show_default=True,
              help="Sampling temperature for pass@k.")
@click.option("--rewards", default="math", show_default=True,
              help="Reward functions, comma-separated (the first defines accuracy), or the "
                   "config's YAML form, e.g. \"[{name: regex, pattern: 'A: (?P<answer>\\d+)'}]\".")
@click.option("--answer-column", default="answer", show_default=True,
              help="The data column holding the ground truth (as the config key "
                   "answer_column, e.g. TRL's solution).")
@click.option("--prompt-column", default="prompt", show_default=True,
              help="The data column holding the prompt (as the config key prompt_column).")
@click.option("--completion-column", default="completion", show_default=True,
              help="The data column holding the response (as the config key "
                   "completion_column).")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap string prompts in the chat template (default: as the model was "
                   "trained when MODEL is a gft run's final/ or checkpoint, else only chat "
                   "prompts).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@_sampling_options
@friendly_errors
def eval_(model: str, data: str | None, split: str, limit: int | None, k: int,
          temperature: float, rewards: str, answer_column: str, prompt_column: str,
          completion_column: str, chat_template: bool | None, as_json: bool,
          system_prompt: str | None,
          backend: str, max_new_tokens: int, dtype: str, seed: int, base: str | None,
          stop: tuple[str, ...]) -> None:
    """Held-out accuracy (greedy pass@1) of MODEL on a data split, and pass@k with -k."""
    import tempfile
    from gft.data import load_split
    from gft.prompts import with_system_prompt
    from gft.trained import system_prompt_for
    from gft.errors import ConfigError
    from gft.evaluate import evaluate
    from gft.rewards import build_rewards
    from gft.rollout import check_context, check_token_ids, prepare_prompts
    from gft.trained import eval_defaults, held_out_data
    model = _local_model(model)
    ctx = click.get_current_context()
    left = {name for name in ("rewards", "answer_column", "prompt_column",
                              "completion_column", "max_new_tokens", "split")
            if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT}
    asked = {"rewards": _reward_option(rewards), "answer_column": answer_column,
             "prompt_column": prompt_column, "completion_column": completion_column,
             "max_new_tokens": max_new_tokens}
    # a gft run's model: scored as its run's in-training evaluation scored it
    taken, said = eval_defaults(model, left, asked)
    scoring = taken.get("rewards", asked["rewards"])
    columns = {key: taken.get(key, asked[key])
               for key in ("answer_column", "prompt_column", "completion_column")}
    max_new_tokens = taken.get("max_new_tokens", max_new_tokens)
    if data is None:  # a gft run's model: on its run's held-out data, else the embedded task
        found = held_out_data(model, None if "split" in left else split)
        if found is not None:
            data, split = found
            said.insert(0, f"--data {data} --split {split} (its held-out data)")
        else:
            from gft.tasks.arith import ArithTaskConfig, write_task
            data = str(write_task(tempfile.mkdtemp(prefix="gft-task-"), ArithTaskConfig()))
    if said:
        click.echo(f"note: evaluating as {model}'s run did: {', '.join(said)}; give an "
                   "option to evaluate otherwise", err=True)
    rows = with_system_prompt(load_split(data, split, **columns)[:limit],
                              system_prompt_for(model, system_prompt, chat_template))
    from gft.data import is_data_file
    if is_data_file(data) and "split" not in left:
        # a file is one split: --split test over train.jsonl would score the training rows
        click.echo(f"note: {data} is one file, all of it evaluated; --split {split} picks a "
                   "split of a data directory", err=True)
    be = _sampler(backend, model, dtype, base, stop)
    if chat_template is None:  # a gft run's model: its prompts as it was trained
        from gft.trained import trained_chat_template
        chat_template = trained_chat_template(model)
    prepared = prepare_prompts(rows, be.tokenizer, chat_template=chat_template,
                               max_prompt_tokens=10**9, overflow="error")
    check_context(be.max_positions, prepared.prompt_ids, max_new_tokens, "--max-new-tokens",
                  reason=be.positions_reason)
    check_token_ids(be.vocab_rows, be.tokenizer, [prepared], max_new_tokens, model)
    from gft.config import TrainConfig
    try:
        scorer = build_rewards(scoring, TrainConfig.reward_timeout)
    except GFTError as e:
        if "rewards" not in taken:  # the user's own: the error says it all
            raise
        raise ConfigError(f"{e} (the rewards {model}'s run trained with, from its gft.json; "
                          "pass --rewards to score with others)") from None
    metrics = evaluate(be, prepared.rows, prepared.prompt_ids, scorer,
                       max_new_tokens=max_new_tokens, k=k, temperature=temperature, seed=seed)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            click.echo(f"{key:>16}: {value:.4f}" if key != "n" else f"{key:>16}: {int(value)}")


def _reward_option(text: str) -> Any:
    """--rewards: "math,my.py:f", or YAML as the config's rewards key takes it (a list or
    mapping), so that a built-in with options (regex's pattern) can be named too."""
    if text.lstrip().startswith(("[", "{")):
        from gft.yamlconfig import parse_override
        return parse_override(f"rewards={text}")[1]
    return [name for name in text.split(",") if name.strip()]


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="curves.png",
              show_default=True, help="Overlay figure, written when several runs are given.")
@click.option("--smooth", type=click.IntRange(1), default=1, show_default=True,
              help="Moving-average window over steps.")
@friendly_errors
def plot(runs: tuple[str, ...], out: str, smooth: int) -> None:
    """PNG curves (reward, held-out accuracy, entropy, grad norm) from RUN directories:
    RUN/curves.png for each, and an overlay of all of them. A damaged line of a
    metrics.jsonl is skipped with a warning naming it."""
    from pathlib import Path
    from gft.plot import plot_runs
    warn = functools.partial(click.echo, err=True)
    for path in plot_runs([Path(r) for r in runs], Path(out), smooth, warn=warn):
        click.echo(f"wrote {path}")


@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Cast floating-point weights (default: keep them; a GGUF file: float32).")
@click.option("--shard-size", metavar="SIZE",
              help="Split weights into shards above SIZE, e.g. 500MB, 2GB (default 5GB).")
@click.option("--to", "to", type=click.Choice(["peft", "mlx-lm"]),
              help="Adapter format to write (default: the other one).")
@click.option("--base", help="The adapter's base model directory (default: the one the "
                             "adapter names), to check which layers it covers.")
@click.option("--quantize", "quantize", type=click.Choice(["4", "8"]),
              help="Write an mlx-lm quantized model with this many bits per weight "
                   "(mlx-lm's own quantization; train LoRA over it with --backend mlx).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]),
              help="Weights sharing one scale and bias with --quantize (default 64).")
@click.option("--dequantize", is_flag=True,
              help="Write an mlx-lm quantized model in full precision (loads in transformers).")
@friendly_errors
def convert(src: str, dst: str, dtype: str | None, shard_size: str | None, to: str | None,
            base: str | None, quantize: str | None, group_size: str | None,
            dequantize: bool) -> None:
    """Rewrite the model or LoRA adapter in SRC as DST: a transformers- or mlx-lm-written
    model becomes a portable directory (config both libraries read alike; dtype, shards),
    quantized (--quantize) or de-quantized (--dequantize) through mlx-lm;
    an adapter moves between PEFT and mlx-lm formats; a GGUF file (llama.cpp, Ollama,
    LM Studio) becomes a model directory, de-quantized through transformers."""
    from gft.convert import convert as convert_
    for line in convert_(src, dst, dtype=dtype, shard_size=shard_size, to=to, base=base,
                         quantize=int(quantize) if quantize else None,
                         group_size=int(group_size) if group_size else None,
                         dequantize=dequantize):
        click.echo(line)


@main.command()
@click.argument("adapter", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--base", help="Base model directory (default: the one the adapter names).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Cast the fused weights (default: the base model's dtype).")
@click.option("--shard-size", metavar="SIZE", help="Shard size, e.g. 2GB (default 5GB).")
@click.option("--requantize", is_flag=True,
              help="Over an mlx-lm quantized base: quantize the fused model again as the base "
                   "was (default: write it de-quantized, in full precision).")
@friendly_errors
def fuse(adapter: str, out: str, base: str | None, dtype: str | None,
         shard_size: str | None, requantize: bool) -> None:
    """Merge a LoRA ADAPTER (PEFT or mlx-lm format) into its base model: OUT is a portable
    model directory with W + (alpha/r)·B·A in every adapted weight. Over a quantized base,
    W is de-quantized first; OUT is full precision unless --requantize."""
    from gft.convert import fuse as fuse_
    for line in fuse_(adapter, out, base=base, dtype=dtype, shard_size=shard_size,
                      requantize=requantize):
        click.echo(line)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@main.command()
def env() -> None:
    """Versions, devices and which backends are available."""
    click.echo(f"gft {_version('gft')}  python {platform.python_version()}  "
               f"{platform.system()} {platform.machine()}")
    for dist in ("numpy", "transformers", "tokenizers", "safetensors", "math-verify", "torch",
                 "mlx", "mlx-lm", "peft", "datasets"):
        click.echo(f"  {dist:<13} {_version(dist)}")
    try:
        import torch
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                        for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            devices.append("mps")
        click.echo(f"backend torch: available, devices: {', '.join(devices)}")
    except ImportError:
        click.echo("backend torch: not installed (pip install 'gft[torch]')")
    try:
        import mlx.core as mx
        click.echo(f"backend mlx: available, default device: {mx.default_device()}")
    except ImportError:
        click.echo("backend mlx: not installed (pip install 'gft[mlx]')")
    from backends import resolve_backend_name
    try:
        click.echo(f"--backend auto picks: {resolve_backend_name('auto')}")
    except GFTError as e:
        click.echo(f"--backend auto: {e}")


if __name__ == "__main__":
    main()
