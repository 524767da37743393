"""The CLI surface: help, env, generate, eval, and the embedded default job."""
import json

import pytest
from click.testing import CliRunner

from cli import main
from gft.tasks.arith import ArithTaskConfig, write_task
from gft.tiny import TinyModelSpec, write_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "model", TinyModelSpec(seed=1))


@pytest.mark.parametrize("command", [[], ["train"], ["generate"], ["eval"], ["env"]])
def test_help_is_complete(command):
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command == ["train"]:
        for option in ("--preset", "--backend", "--model", "--data", "--resume", "--set"):
            assert option in result.output


def test_help_config_lists_every_key():
    from gft.config import FIELDS
    result = CliRunner().invoke(main, ["train", "--help-config"])
    assert result.exit_code == 0
    for name in FIELDS:
        assert name in result.output


def test_env_reports_backends():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0
    assert "backend torch: available" in result.output
    assert "--backend auto picks: torch" in result.output


def test_generate_greedy_is_deterministic(model_dir):
    args = ["generate", str(model_dir), "-p", "Hello", "-p", "2+2=", "--max-new-tokens", "5"]
    a = CliRunner().invoke(main, args)
    b = CliRunner().invoke(main, args)
    assert a.exit_code == 0, a.output
    assert a.output == b.output and len(a.output.splitlines()) >= 1


def test_generate_names_the_sampling_a_generation_config_asks_for(model_dir, tmp_path):
    """A generation_config.json with do_sample (Qwen's, Llama 3's: what transformers'
    generate() follows) is named in one note with the options that sample as it says:
    gft generate stays greedy by default, as mlx-lm's generate is. Before, the file's
    sampling was dropped in silence. A --temperature given says nothing more."""
    import shutil
    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    path = model / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True,
                                "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                "repetition_penalty": 1.05}))
    args = ["generate", str(model), "-p", "Hello", "--max-new-tokens", "5", "--backend", "torch"]
    greedy = CliRunner().invoke(main, ["generate", str(model_dir), *args[2:]])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    note, *lines = result.output.splitlines()
    assert note == (f"note: {path} samples (do_sample: temperature 0.6, top_p 0.9, top_k 20, "
                    "repetition_penalty 1.05), as transformers' generate() would; gft generate "
                    "decodes greedily unless told, as mlx-lm's does: add --temperature 0.6 "
                    "--top-p 0.9 to sample as it says (top_k and repetition_penalty are not "
                    "applied: gft samples with temperature and top_p)")
    assert lines == greedy.output.splitlines()  # still greedy
    sampled = CliRunner().invoke(main, args + ["--temperature", "0.6", "--top-p", "0.9"])
    assert sampled.exit_code == 0 and "note:" not in sampled.output
    # a LoRA adapter has no generation config: its base's applies, as in transformers
    from backends import load_backend
    from gft.checkpoint import save_checkpoint
    from gft.lora import LoraConfig
    adapter = save_checkpoint(load_backend("torch", str(model), lora=LoraConfig(
        4, 8.0, targets=("q_proj",))), tmp_path / "adapter", {"config": {}, "loop": {}})
    result = CliRunner().invoke(main, ["generate", str(adapter), *args[2:]])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == note


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_base_with_a_model_that_is_no_adapter_is_refused(model_dir, command):
    """--base names an adapter's base model; with a full model it was ignored in silence,
    so the user sampled another model than the one they named."""
    args = ["-p", "hi"] if command == "generate" else ["--limit", "1"]
    result = CliRunner().invoke(main, [command, str(model_dir), *args, "--base", "elsewhere",
                                       "--max-new-tokens", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: --base elsewhere: {model_dir} is a model, not a LoRA adapter; --base names "
        "the base model under an adapter")


def test_eval_reports_accuracy_and_pass_at_k(model_dir, tmp_path):
    data = write_task(tmp_path / "task", ArithTaskConfig(n_train=8, n_test=6, n_valid=2))
    result = CliRunner().invoke(main, ["eval", str(model_dir), "--data", str(data), "-k", "3",
                                       "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0 and "pass@3" in metrics


def test_eval_reads_trl_data_with_a_solution_column_and_rewards_with_options(model_dir,
                                                                            tmp_path):
    """A run can train on TRL's `solution` column (answer_column) and a regex reward with
    its pattern, but gft eval could not score either: 'column answer is missing'."""
    data = tmp_path / "sol.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i}+1?\nA:",
                                        "solution": str(i + 1)}) + "\n" for i in range(3)))
    args = ["eval", str(model_dir), "--data", str(data), "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(main, [*args, "--answer-column", "solution",
                                       "--rewards", "math,exact"])
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.output.strip().splitlines()[-1])) >= {"rewards/math",
                                                                       "rewards/exact"}
    result = CliRunner().invoke(main, [*args, "--rewards", "[{name: regex, pattern: '.'}]"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["rewards/regex"] == 1.0


def test_eval_split_over_one_file_says_the_whole_file_is_scored(model_dir, tmp_path):
    """--split test over train.jsonl scored the training rows as if held out, in silence."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                            for i in range(2)))
    args = ["eval", str(model_dir), "--data", str(data), "--max-new-tokens", "2", "--json"]
    said = CliRunner().invoke(main, [*args, "--split", "test"])
    assert said.exit_code == 0, said.output
    assert f"note: {data} is one file, all of it evaluated; --split test" in said.output
    assert json.loads(said.output.strip().splitlines()[-1])["n"] == 2
    default = CliRunner().invoke(main, args)  # the default split: nothing to say
    assert default.exit_code == 0 and "note:" not in default.output


def test_unknown_key_is_one_line_with_suggestion():
    result = CliRunner().invoke(main, ["train", "--set", "learnig_rate=1"])
    assert result.exit_code == 2
    assert "did you mean 'learning_rate'" in result.output and "Traceback" not in result.output


def test_default_job_runs_offline(tmp_path, monkeypatch):
    # `gft train` with no model and no data: the embedded tiny model and arithmetic task.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--max-steps", "2", "--set", "eval_samples=4",
                                       "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    assert "embedded default" in result.output and "final checkpoint:" in result.output
    run = next((tmp_path / "runs").iterdir())
    assert (run / "final" / "model.safetensors").exists()
    assert (run / "task" / "test.jsonl").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "eval/accuracy" in records[0]
    assert [r["preset"] for r in records if "loss" in r] == ["sft", "sft"]


@pytest.mark.slow
def test_default_job_accuracy_rises(tmp_path, monkeypatch):
    """The README's first command, in full: held-out accuracy must rise from its start."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    run = next((tmp_path / "runs").iterdir())
    acc = [json.loads(x)["eval/accuracy"] for x in (run / "metrics.jsonl").read_text().splitlines()
           if "eval/accuracy" in json.loads(x)]
    assert acc[0] <= 0.05 and acc[-1] >= acc[0] + 0.15, acc


def test_plot_writes_png_per_run_and_overlay(tmp_path):
    for name, shift in (("a", 0.0), ("b", 0.1)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 0, "eval/accuracy": 0.0}] + [
            {"step": s, "loss": 1.0 / s, "reward/rollout": shift + s / 10, "entropy": 2.0 - s / 10,
             "grad_norm": 1.0, **({"eval/accuracy": s / 10} if s % 2 == 0 else {})}
            for s in range(1, 6)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "overlay.png"
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "a"), str(tmp_path / "b"),
                                       "-o", str(out), "--smooth", "2"])
    assert result.exit_code == 0, result.output
    for path in (tmp_path / "a" / "curves.png", tmp_path / "b" / "curves.png", out):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_a_directory_without_metrics(tmp_path):
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.output


def test_auto_backend_prefers_mlx_on_apple_silicon(monkeypatch):
    import importlib.util
    import platform
    import sys

    import backends
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "mlx" else real_find_spec(name, *a))
    assert backends.resolve_backend_name("auto") == "mlx"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert backends.resolve_backend_name("auto") == "torch"


def mlx_lm_adapter(project, base_name: str = "base"):
    """An adapter as mlx_lm.lora writes it, run in `project` as `mlx_lm.lora --model
    base --adapter-path adapters --num-layers 2` (its tuner's own LoRA layers and its
    own config writer; B set off zero, as training would, so that it can be told from a
    fresh adapter)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config
    write_tiny_model(project / base_name, TinyModelSpec(seed=1))
    model, _ = load_model(project / base_name)
    model.freeze()
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0}
    linear_to_lora_layers(model, 2, params)
    rng = np.random.default_rng(0)
    weights = {k: mx.array(rng.normal(0, 0.1, v.shape).astype(np.float32))
               for k, v in tree_flatten(model.trainable_parameters())}
    out = project / "adapters"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    save_config({"model": base_name, "adapter_path": "adapters", "fine_tune_type": "lora",
                 "num_layers": 2, "lora_parameters": params, "train": True, "iters": 2},
                out / "adapter_config.json")
    return out, weights


def test_an_mlx_lm_adapter_trains_on_and_generates_from_any_directory(tmp_path, monkeypatch):
    """`gft train --model ADAPTERS` on mlx_lm.lora's output was refused ('make it a PEFT
    one first'); its "model" is relative to where mlx_lm.lora ran, not to the adapter."""
    import numpy as np
    from backends import load_backend
    adapter, weights = mlx_lm_adapter(tmp_path / "project")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    be = load_backend("torch", str(adapter))  # the adapter's weights, not a fresh one
    ours = be.named_parameters()
    assert len(ours) == len(weights) == 28
    for key, value in weights.items():  # mlx-lm stores A^T and B^T
        peft = "base_model.model." + key.replace(".lora_a", ".lora_A.weight").replace(
            ".lora_b", ".lora_B.weight")
        assert np.allclose(ours[peft], np.array(value).T)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n"
                            for i in range(2)))
    result = CliRunner().invoke(main, [
        "train", "--model", str(adapter), "--data", str(rows), "--preset", "sft",
        "--max-steps", "1", "-o", "run", "--backend", "torch", "--set", "prompts_per_step=2",
        "--set", "prompts_per_minibatch=2", "--set", "eval_samples=0",
        "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "elsewhere/run/final/adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str((tmp_path / "project/base").resolve())
    (tmp_path / "project/base").rename(tmp_path / "moved-base")
    result = CliRunner().invoke(main, ["generate", str(adapter), "-p", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{adapter}/adapter_config.json: model 'base' is not on this machine" in result.output
    assert "--base PATH" in result.output
    result = CliRunner().invoke(main, ["generate", str(adapter), "-p", "1", "--max-new-tokens",
                                       "3", "--base", str(tmp_path / "moved-base")])
    assert result.exit_code == 0, result.output


def test_a_hub_model_is_sampled_from_its_snapshot_with_its_gft_json(tmp_path, monkeypatch):
    """`gft generate org/name` and `gft eval org/name` read the downloaded copy as a local
    folder: its gft.json (prompt format, stops) applies as it does to the run's final/.
    No hub is reachable here: huggingface_hub's snapshot_download, which gft fetches the
    repository's model files with, stands in with a local folder."""
    import huggingface_hub
    from gft.checkpoint import MODEL_RECORD
    from tests.helpers import scaled_tiny
    snapshot = scaled_tiny(tmp_path / "snapshot")
    # trained on plain prompts though the tokenizer has a chat template, with a stop
    (snapshot / MODEL_RECORD).write_text(json.dumps({"chat_template": False, "stop": ["\n"]}))
    asked = []
    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(snapshot)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["-p", "Hello", "--max-new-tokens", "12", "--backend", "torch"]
    local = CliRunner().invoke(main, ["generate", str(snapshot), *args])
    hub = CliRunner().invoke(main, ["generate", "org/name", *args])
    assert hub.exit_code == 0, hub.output
    assert hub.output == local.output and asked == ["org/name"]
    plain = CliRunner().invoke(main, ["generate", str(snapshot), *args, "--no-chat-template"])
    assert hub.output == plain.output  # as the record says, not the tokenizer's template
    templated = CliRunner().invoke(main, ["generate", str(snapshot), *args, "--chat-template"])
    assert templated.output != plain.output
    data = write_task(tmp_path / "task", ArithTaskConfig(n_train=2, n_test=2, n_valid=0))
    result = CliRunner().invoke(main, ["eval", "org/name", "--data", str(data), "--json",
                                       "--max-new-tokens", "4", "--backend", "torch"])
    assert result.exit_code == 0 and asked == ["org/name"] * 2, result.output


def test_a_hub_model_that_cannot_be_fetched_is_one_line(monkeypatch):
    import huggingface_hub
    def snapshot_download(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find an appropriate "
                                                             "cached snapshot folder")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = CliRunner().invoke(main, ["generate", "org/name", "-p", "hi"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: org/name: no such folder, and the Hugging Face Hub did not give a model of "
        "that id: LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder"]


def test_eval_on_a_gft_runs_model_scores_as_its_run_evaluated(tmp_path):
    """Options left at their defaults take the run's rewards, answer_column and
    max_response_tokens (its gft.json), so `gft eval runs/x/final` scores as the run's
    in-training evaluation did; before, it scored with math on 'answer', here refused
    (the data's ground truth is TRL's 'solution'), elsewhere another accuracy in silence."""
    import shutil
    from gft.checkpoint import MODEL_RECORD
    model = tmp_path / "final"
    shutil.copytree(write_tiny_model(tmp_path / "m", TinyModelSpec(seed=1)), model)
    (model / MODEL_RECORD).write_text(json.dumps({
        "chat_template": False, "stop": [], "rewards": ["exact"], "answer_column": "solution",
        "max_response_tokens": 3, "step": 2}))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: say yes\nA:", "solution": "yes"})
                            + "\n" for i in range(2)))
    args = ["eval", str(model), "--data", str(data), "--backend", "torch", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    note, line = result.output.strip().splitlines()
    assert note == (f"note: evaluating as {model}'s run did: --rewards exact, "
                    "--answer-column solution, --max-new-tokens 3 (its max_response_tokens); "
                    "give an option to evaluate otherwise")
    assert set(json.loads(line)) == {"n", "accuracy", "reward", "rewards/exact"}
    # options given are used as given, with no note
    given = CliRunner().invoke(main, args + ["--rewards", "math", "--answer-column",
                                            "solution", "--max-new-tokens", "3"])
    assert given.exit_code == 0, given.output
    assert set(json.loads(given.output)) == {"n", "accuracy", "reward", "rewards/math"}
    # the run's rewards may name a file this machine lacks: one line saying what to pass
    (model / MODEL_RECORD).write_text(json.dumps({"rewards": ["/gone/r.py:f"]}))
    result = CliRunner().invoke(main, args + ["--answer-column", "solution"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1].endswith(
        f"(the rewards {model}'s run trained with, from its gft.json; pass --rewards to "
        "score with others)")


def test_generate_takes_chat_messages_and_standard_input(tmp_path):
    """-p '[{"role": ...}]' is a chat prompt (as a data row's 'prompt' may be: a system
    turn, few-shot turns, an assistant prefill), rendered with the chat template; before,
    the JSON text itself was the prompt. -p - reads standard input, as mlx-lm's generate
    does; before, the prompt was the one character '-'."""
    from tests.helpers import scaled_tiny
    model = scaled_tiny(tmp_path / "model")  # completions that depend on the prompt
    args = ["generate", str(model), "--max-new-tokens", "8", "--backend", "torch"]
    def run(*extra, stdin=None):
        result = CliRunner().invoke(main, args + list(extra), input=stdin)
        return result.exit_code, result.output
    chat = json.dumps([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hello"}])
    code, out = run("-p", chat)
    assert code == 0, out
    assert out != run("-p", "Be brief. Hello", "--chat-template")[1]
    user_only = json.dumps([{"role": "user", "content": "Hello"}])
    assert run("-p", user_only) == run("-p", "Hello", "--chat-template")
    assert run("-p", "-", "--no-chat-template", stdin="Q: 2+2\nA:") == \
        run("-p", "Q: 2+2\nA:", "--no-chat-template")
    assert run("-p", "[INST] hi [/INST]", "--no-chat-template")[0] == 0  # text, not JSON
    code, out = run("-p", json.dumps([{"role": "user"}]))
    assert (code, out) == (2, "error: --prompt:1: field 'prompt[0].content': missing\n")
    code, out = run("-p", "-", stdin="")
    assert (code, out) == (2, "error: -p 1: standard input is empty; give some text to "
                              "continue\n")


def test_an_adapter_over_a_hub_base_reads_the_bases_snapshot(tmp_path, monkeypatch):
    """A PEFT adapter whose base_model_name_or_path is a Hub id (as most published
    adapters' are): the base is fetched like MODEL, so its generation_config.json's eos
    ids end completions and --backend mlx can load it; before, the base went to
    transformers by id (mlx: no such folder) and its eos ids were never read."""
    import huggingface_hub
    from gft.lora import LoraConfig, write_peft_config
    from gft.tiny import EOS_ID
    from tests.helpers import scaled_tiny
    base = scaled_tiny(tmp_path / "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    args = ["-p", "Hello", "--max-new-tokens", "12", "--backend", "torch",
            "--no-chat-template"]
    free = CliRunner().invoke(main, ["generate", str(base), *args]).output
    stop = next(c for c in free[1:] if c.isascii() and c.isprintable())
    (base / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [EOS_ID, ord(stop)]}))
    # a LoRA adapter with B = 0: the base's own output
    import numpy as np
    from safetensors.numpy import save_file
    cfg = json.loads((base / "config.json").read_text())
    d = cfg["hidden_size"]
    out = cfg["num_attention_heads"] * cfg.get("head_dim", d // cfg["num_attention_heads"])
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{w}.weight": a
               for i in range(cfg["num_hidden_layers"])
               for w, a in (("A", np.ones((4, d), np.float32)),
                            ("B", np.zeros((out, 4), np.float32)))},
              str(adapter / "adapter_model.safetensors"))
    write_peft_config(adapter, LoraConfig(4, 8.0, 0.0, ("q_proj",)), "org/base")
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: str(base) if repo_id == "org/base" else None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(main, ["generate", str(adapter), *args])
    assert result.exit_code == 0, result.output
    assert result.output == free[:free.index(stop) + 1] + "\n"


def test_eval_on_a_runs_model_finds_the_split_its_run_held_out(tmp_path, model_dir):
    """`gft eval RUN/final` without --data takes the rows its run evaluated on, found as
    the run found them: the data directory's eval_split, else valid, or eval_data naming
    a split. Before, it asked for 'test' whatever the run used and failed with data.py's
    generic 'no test split'; a directory with no held-out split at all (the run held rows
    out by eval_holdout, or evaluated nothing) now says so, naming the run and --data."""
    import shutil
    import yaml
    data = tmp_path / "data"
    data.mkdir()
    rows = "".join(json.dumps({"prompt": f"Q{i}: say yes\nA:", "answer": "yes"}) + "\n"
                   for i in range(3))
    (data / "train.jsonl").write_text(rows)
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    args = ["eval", str(run / "final"), "--backend", "torch", "--max-new-tokens", "2",
            "--json", "--rewards", "exact"]

    def evaluate(config: dict) -> list[str]:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        return CliRunner().invoke(main, args).output.splitlines()

    said = evaluate({"data": str(data), "eval_holdout": 0.1})
    assert said == [f"error: {run / 'final'}: its run's data {data} has no held-out split "
                    "('test' or 'valid'): the run evaluated on rows eval_holdout set aside "
                    "from training, or on none; pass --data FILE, or --data DIR --split NAME, "
                    "with held-out rows"]
    (data / "valid.jsonl").write_text(rows[:rows.index("\n") + 1])  # the run fell back to it
    note, line = evaluate({"data": str(data)})
    assert f"--data {data} --split valid (its held-out data)" in note
    assert json.loads(line)["n"] == 1
    (data / "dev.jsonl").write_text(rows)  # eval_data naming a split of the data directory
    note, line = evaluate({"data": str(data), "eval_data": "dev"})
    assert f"--data {data} --split dev (its held-out data)" in note
    assert json.loads(line)["n"] == 3
    # a run that read its prompts from another column: the split is found reading it so
    (data / "valid.jsonl").write_text(json.dumps({"problem": "Q: say yes\nA:",
                                                  "answer": "yes"}) + "\n")
    note, line = evaluate({"data": str(data), "prompt_column": "problem"})
    assert f"--data {data} --split valid (its held-out data)" in note
    assert json.loads(line)["n"] == 1


def test_eval_of_a_run_on_hub_data_with_a_split_named_eval_data_takes_that_split(tmp_path,
                                                                                 model_dir):
    """data: org/name with eval_data: test (a split name of the Hub data set) was taken for
    a local folder gone from this machine."""
    import shutil
    import yaml
    from gft.trained import held_out_data
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": "openai/gsm8k:main",
                                                     "eval_data": "test"}))
    assert held_out_data(str(run / "final"), None) == ("openai/gsm8k:main", "test")


def test_a_data_sets_own_column_names_and_a_system_prompt_train_and_travel(tmp_path):
    """MATH-style rows (problem / solution) train with prompt_column and
    completion_column (mlx-lm's prompt_feature / completion_feature, Open-R1's
    dataset_prompt_column), under a system_prompt; before, every such data set had to be
    rewritten first. The trained model's gft.json carries them, so gft eval reads the same
    rows without options, and gft generate prompts with the system message."""
    from gft.checkpoint import MODEL_RECORD
    from tests.helpers import scaled_tiny
    model = scaled_tiny(tmp_path / "model")
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + 1?",
                                        "solution": f"It is {i + 1}. \\boxed{{{i + 1}}}"})
                            + "\n" for i in range(4)))
    run = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "train", "--model", str(model), "--data", str(data), "-o", str(run),
        "--backend", "torch", "--max-steps", "1", "--set", "preset=sft",
        "--set", "prompt_column=problem", "--set", "completion_column=solution",
        "--set", "answer_column=solution", "--set", "system_prompt=Answer in a box.",
        "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
        "--set", "max_response_tokens=16", "--set", "eval_samples=0",
        "--set", "progress=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((run / "final" / MODEL_RECORD).read_text())
    assert (record["prompt_column"], record["completion_column"], record["system_prompt"],
            record["chat_template"]) == ("problem", "solution", "Answer in a box.", True)
    evaluated = CliRunner().invoke(main, ["eval", str(run / "final"), "--data", str(data),
                                          "--backend", "torch", "--max-new-tokens", "4",
                                          "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "--prompt-column problem" in evaluated.output and json.loads(
        evaluated.output.splitlines()[-1])["n"] == 4
    generate = ["generate", str(run / "final"), "--max-new-tokens", "6", "--backend", "torch"]
    said = CliRunner().invoke(main, generate + ["-p", "What is 7 + 1?"]).output
    system = json.dumps([{"role": "system", "content": "Answer in a box."},
                         {"role": "user", "content": "What is 7 + 1?"}])
    assert said == CliRunner().invoke(main, generate + ["-p", system]).output
    without = CliRunner().invoke(main, generate + ["-p", "What is 7 + 1?",
                                                   "--system-prompt", ""]).output
    assert without != said  # the system message is what made the difference


def test_a_system_prompt_without_a_chat_template_is_named(tmp_path):
    """A base model's tokenizer has no chat template: system_prompt made every string
    prompt a chat, and the run stopped on the first row as if the data held chats. And
    --no-chat-template cannot take a system message either."""
    from tests.helpers import scaled_tiny
    model = scaled_tiny(tmp_path / "model")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 2+2?\nA:", "completion": " 4"}) + "\n")
    result = CliRunner().invoke(main, [
        "train", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "run"),
        "--backend", "torch", "--max-steps", "1", "--set", "preset=sft",
        "--set", "system_prompt=Be brief.", "--set", "prompts_per_step=1",
        "--set", "prompts_per_minibatch=1", "--set", "progress=false"])
    assert result.exit_code == 2 and result.output.splitlines()[-1].startswith(
        f"error: system_prompt: {model}'s tokenizer has no chat template"), result.output
    said = CliRunner().invoke(main, ["generate", str(model), "-p", "hi", "--backend", "torch",
                                     "--no-chat-template", "--system-prompt", "Be brief."])
    assert said.exit_code == 2 and "--system-prompt is a chat turn" in said.output
