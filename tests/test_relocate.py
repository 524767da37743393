"""A run directory moves: copied elsewhere (the original deleted), it resumes, generates,
evaluates and fuses from another working directory, on both backends, for a full model
and for LoRA; its final/ holds only what users hand on.

The runs use the embedded default model and task, which gft writes inside the run
directory (base-model/, task/): the case where stored paths must follow the directory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli import main
from gft.runpaths import adapter_base, base_for_adapter, resolve_stored, stored_path
from gft.errors import ConfigError

pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

SMALL = ["--preset", "sft", "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
         "--set", "max_response_tokens=4", "--set", "eval_samples=2", "--set", "progress=false",
         "--set", "save_every=1"]
LORA = ["--set", "lora_rank=4", "--set", "lora_alpha=8"]
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
RECORD = {"gft.json"}  # how the run rendered prompts, for a final/ copied out alone


def gft(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.mark.parametrize("backend,lora", [("torch", False), ("mlx", True),
                                          pytest.param("mlx", False, marks=pytest.mark.slow),
                                          pytest.param("torch", True, marks=pytest.mark.slow)])
def test_a_copied_run_resumes_generates_evaluates_and_fuses_elsewhere(
        tmp_path, monkeypatch, backend, lora):
    first, second = tmp_path / "first", tmp_path / "second" / "cwd"
    first.mkdir()
    second.mkdir(parents=True)
    monkeypatch.chdir(first)
    gft("train", "-o", "runs/demo", "--backend", backend, "--max-steps", "2", *SMALL,
        *(LORA if lora else []))
    saved = yaml.safe_load(Path("runs/demo/config.yaml").read_text())
    assert (saved["model"], saved["data"]) == ("./base-model", "./task")
    final = {p.name for p in Path("runs/demo/final").iterdir()}
    weights = {"adapter_config.json", "adapter_model.safetensors"} if lora else {
        "config.json", "model.safetensors", "generation_config.json"}
    assert final == weights | TOKENIZER | RECORD  # no optimizer, no trainer state
    moved = tmp_path / "elsewhere" / "demo"
    shutil.copytree("runs/demo", moved)
    monkeypatch.chdir(second)
    shutil.rmtree(first)  # the original is gone
    run = "../../elsewhere/demo"  # a relative path from a new working directory
    out = gft("train", "--resume", run, "--set", "max_steps=3")
    assert "(step 2)" in out and f"backend: {backend}" in out
    if lora:
        cfg = json.loads((moved / "final" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "../base-model"
    text = gft("generate", f"{run}/final", "-p", "What is 1 plus 1?\nA:", "--max-new-tokens",
               "4", "--backend", backend)
    assert text.strip() is not None
    metrics = json.loads(gft("eval", f"{run}/final", "--data", f"{run}/task", "--limit", "2",
                             "--max-new-tokens", "4", "--backend", backend, "--json"))
    assert metrics["n"] == 2
    if lora:
        gft("fuse", f"{run}/final", "fused")
        assert (Path("fused") / "model.safetensors").is_file()
        gft("convert", f"{run}/final", "mlx-adapter", "--to", "mlx-lm")
        for out in ("fused", "mlx-adapter"):  # the prompts' format travels with the adapter
            assert (Path(out) / "gft.json").read_text() == (moved / "final" / "gft.json").read_text()
        # the adapter alone, its base elsewhere: --base supplies it, the tokenizer travels
        shutil.copytree(moved / "final", "adapter")
        words = refused("generate", "adapter", "-p", "1", "--backend", backend)
        assert "base_model_name_or_path" in words and "--base" in words
        # a lone adapter directory renders prompts as its run did (gft.json): plain
        alone = gft("generate", "adapter", "--base", f"{run}/base-model", "-p",
                    "What is 1 plus 1?\nA:", "--max-new-tokens", "4", "--backend", backend)
        assert alone == text


@pytest.mark.parametrize("chat_template", [None, True])
def test_a_final_copied_out_alone_renders_prompts_as_its_run_trained(
        tmp_path, monkeypatch, chat_template):
    """final/ copied alone (another machine, a hub upload) has no config.yaml beside it:
    gft generate and eval on it fell back to the tokenizer's template, which the default
    job's tokenizer has and its plain-prompt run never used."""
    from gft.trained import trained_chat_template
    monkeypatch.chdir(tmp_path)
    extra = ["--set", "chat_template=true"] if chat_template else []
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", *SMALL, *extra)
    shutil.copytree("run/final", "elsewhere/model")
    assert trained_chat_template("elsewhere/model") is bool(chat_template)
    prompt = ["-p", "What is 1 plus 1?\nA:", "--max-new-tokens", "6", "--backend", "torch"]
    assert gft("generate", "elsewhere/model", *prompt) == gft("generate", "run/final", *prompt)
    ask = ["--data", "run/task", "--limit", "2", "--max-new-tokens", "4", "--backend", "torch",
           "--json"]
    assert gft("eval", "elsewhere/model", *ask) == gft("eval", "run/final", *ask)


def test_a_missing_path_names_the_key_and_the_option(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", *SMALL)
    shutil.rmtree("run/task")
    words = refused("train", "--resume", "run", "--set", "max_steps=2")
    assert "data './task'" in words and "--data" in words
    # the checkpoint holds the whole model: its base is not needed (next test); starting
    # over from config.yaml (no checkpoint) it is
    shutil.rmtree("run/base-model")
    shutil.rmtree("run/checkpoints")
    words = refused("train", "--resume", "run", "--set", "max_steps=2", "--data", "nowhere")
    assert "model './base-model'" in words and "--model" in words


def test_a_run_copied_with_only_its_last_checkpoint_resumes(tmp_path, monkeypatch):
    """A full fine-tune's checkpoint holds the whole model, yet a copy without the run's
    base-model/ was refused: "model './base-model' is not on this machine"."""
    monkeypatch.chdir(tmp_path)
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", *SMALL)
    shutil.copytree("run/checkpoints/step-000001", "copy/checkpoints/step-000001")
    out = gft("train", "--resume", "copy", "--set", "max_steps=2", "--data", "run/task")
    assert "(step 1)" in out and "final checkpoint" in out
    saved = yaml.safe_load(Path("copy/config.yaml").read_text())
    assert saved["model"] == "./base-model"  # kept as stored, for when it comes back


def test_a_lora_run_trained_on_from_an_adapter_resumes_without_that_adapter(
        tmp_path, monkeypatch):
    """`gft train --model ADAPTER` trains those adapters on; its checkpoints hold them and
    name their base. A resume still required the adapter folder it started from
    ("model 'first/final' is not on this machine"): now only the base."""
    monkeypatch.chdir(tmp_path)
    gft("train", "-o", "first", "--backend", "torch", "--max-steps", "1", *SMALL, *LORA)
    gft("train", "--model", "first/final", "-o", "second", "--backend", "torch",
        "--max-steps", "1", *SMALL, *LORA)
    trained = (Path("second/final/adapter_model.safetensors")).read_bytes()
    shutil.rmtree("first/final")
    shutil.rmtree("first/checkpoints")  # first/base-model stays
    out = gft("train", "--resume", "second", "--set", "max_steps=2")
    assert "(step 1)" in out and "final checkpoint" in out
    assert Path("second/final/adapter_model.safetensors").read_bytes() != trained
    saved = yaml.safe_load(Path("second/config.yaml").read_text())
    assert saved["model"] == str(Path("first/final").resolve())  # kept as stored
    base = json.loads(Path("second/final/adapter_config.json").read_text())
    assert base["base_model_name_or_path"] == str(Path("first/base-model").resolve())
    shutil.rmtree("first/base-model")  # without the base too, the stored model is asked for
    words = refused("train", "--resume", "second", "--set", "max_steps=3")
    assert "model '" in words and "--model" in words


def test_eval_on_a_runs_model_without_data_uses_the_runs_held_out_data(tmp_path, monkeypatch):
    """`gft eval RUN/final` without --data evaluated the embedded arithmetic task whatever
    the run trained on, in silence: now its run's held-out split (a note says so), and
    a run on one file (no held-out split) asks for --data."""
    from tests.helpers import say_yes_data
    monkeypatch.chdir(tmp_path)
    say_yes_data(tmp_path / "yes")
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", "--data", "yes",
        *SMALL)
    ask = ["--backend", "torch", "--max-new-tokens", "2", "--json"]
    out = gft("eval", "run/final", *ask)
    assert f"--data {tmp_path / 'yes'} --split test (its held-out data)" in out
    assert json.loads(out.splitlines()[-1])["n"] == 4  # say_yes_data's test rows
    assert json.loads(gft("eval", "run/final", *ask, "--data", "yes"))["n"] == 4
    shutil.copytree("run/final", "alone")  # out of its run: where its data lay is unknown
    assert json.loads(gft("eval", "alone", *ask, "--limit", "3"))["n"] == 3  # embedded task
    gft("train", "-o", "one", "--backend", "torch", "--max-steps", "1", "--data",
        "yes/train.jsonl", *SMALL)
    words = refused("eval", "one/final", *ask)
    assert "one file" in words and "pass --data" in words


def test_stored_paths(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "task").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    assert stored_path(str(run / "task"), run) == "./task"
    assert stored_path(str(tmp_path / "data"), run) == str((tmp_path / "data").resolve())
    assert stored_path("HuggingFaceTB/SmolLM2-135M", run) == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_stored("./task", run, "data", "x") == str(run / "task")
    assert resolve_stored("org/hub-model", run, "model", "x") == "org/hub-model"
    with pytest.raises(ConfigError, match="pass it with --model"):
        resolve_stored("/no/such/model", run, "model", "x")
    # an adapter keeps what the user gave, but a base inside its run moves with it
    assert base_for_adapter("org/hub-model", run / "final") == "org/hub-model"
    assert base_for_adapter(str(tmp_path / "data"), run / "final") == str(tmp_path / "data")
    assert base_for_adapter(str(run / "task"), run / "checkpoints" / "step-000001") \
        == "../../task"
    # a path relative to the working directory is stored absolute: read back from any
    # other directory (bug: '../base' from a run started with --model ../base named
    # another place everywhere else); an adapter outside any run (gft convert OUT) is not
    # inside its parent directory's "run"
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert base_for_adapter("../data", run / "final") == str((tmp_path / "data").resolve())
    assert base_for_adapter("../data", tmp_path / "converted") == str((tmp_path / "data").resolve())
    (run / "final").mkdir()
    assert adapter_base("../task", run / "final") == str(run / "task")


def test_reward_files_and_eval_data_given_relative_move_with_the_run(tmp_path, monkeypatch):
    """README: a copied run resumes 'from any working directory'. A reward given as
    `my_rewards.py:f` and an eval_data file given relative to where the run started were
    stored as typed, so a resume from elsewhere stopped: 'reward file not found'."""
    start = tmp_path / "project"
    start.mkdir()
    monkeypatch.chdir(start)
    Path("my_rewards.py").write_text(
        "def reward_len(completions, **kwargs):\n"
        "    return [-abs(20 - len(c)) for c in completions]\n")
    rows = [{"prompt": f"Q{i}: say yes\nA:", "completion": " yes"} for i in range(4)]
    for name in ("train.jsonl", "held.jsonl"):
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", "--data", "train.jsonl",
        *SMALL, "--set", "rewards=[{name: my_rewards.py:reward_len, weight: 1e-1}]",
        "--set", "eval_data=held.jsonl")
    saved = yaml.safe_load(Path("run/config.yaml").read_text())
    assert saved["rewards"] == [{"name": str((start / "my_rewards.py").resolve())
                                 + ":reward_len", "weight": 0.1}]
    assert saved["eval_data"] == str((start / "held.jsonl").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(start / "run", elsewhere / "moved")
    monkeypatch.chdir(elsewhere)
    out = gft("train", "--resume", "moved", "--set", "max_steps=2")
    assert "held-out rows from eval_data" in out and "final checkpoint" in out


def test_stored_reward_files_inside_the_run_resolve_there(tmp_path):
    from gft.runpaths import resolve_stored_extras, stored_config
    run = tmp_path / "run"
    run.mkdir()
    (run / "r.py").write_text("")
    stored = stored_config({"model": None, "data": None, "eval_data": "test",
                            "rewards": {str(run / "r.py") + ":f": 1.0, "math": 0.5}}, run)
    assert stored["rewards"] == {"./r.py:f": 1.0, "math": 0.5}
    assert stored["eval_data"] == "test"  # a split name, not a path
    found = resolve_stored_extras(stored, run)
    assert found["rewards"] == {str(run / "r.py") + ":f": 1.0, "math": 0.5}
    assert found["eval_data"] == "test"


@pytest.mark.parametrize("length", [["--max-steps", "1"], ["--set", "epochs=0.001"]])
def test_resuming_a_finished_run_loads_nothing_and_keeps_final(tmp_path, monkeypatch, length):
    """It said 'nothing to train' after loading the model, and re-exported final/."""
    import backends
    monkeypatch.chdir(tmp_path)
    gft("train", "-o", "run", "--backend", "torch", *length, *SMALL)
    before = {f.name: f.stat() for f in Path("run/final").iterdir()}

    def load_backend(*args, **kwargs):
        raise AssertionError("a finished run loaded its model")
    monkeypatch.setattr(backends, "load_backend", load_backend)
    out = gft("train", "--resume", "run")
    assert "note: nothing to train: the run has done 1 steps of its 1" in out
    after = {f.name: f.stat() for f in Path("run/final").iterdir()}
    assert {k: (s.st_ino, s.st_mtime_ns) for k, s in after.items()} \
        == {k: (s.st_ino, s.st_mtime_ns) for k, s in before.items()}  # not rewritten
    # killed between its last checkpoint and final/: the export is made, still unloaded
    shutil.rmtree("run/final")
    gft("train", "--resume", "run")
    assert {f.name for f in Path("run/final").iterdir()} == set(before)


def test_the_quantized_base_record_names_its_base_from_final_and_converted_copies(tmp_path):
    """base_quantization.json's base_model, stored relative to the adapter when the base
    lies inside the run, was copied as is into final/ (one level up) and by gft convert:
    it then named a directory that is not the base. gft fuse's note reads it."""
    from gft.quant import BASE_QUANT_FILE, read_base_record, write_base_record
    from gft.run import export_final
    run = tmp_path / "run"
    base = run / "base-4bit"
    base.mkdir(parents=True)
    step = run / "checkpoints" / "step-000001"
    step.mkdir(parents=True)
    (step / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": base_for_adapter(str(base), step)}))
    write_base_record(step, {"base_model": str(base), "format": "mlx-lm", "description": "4-bit"})
    assert json.loads((step / BASE_QUANT_FILE).read_text())["base_model"] == "../../base-4bit"
    export_final(step, run / "final")
    assert json.loads((run / "final" / BASE_QUANT_FILE).read_text())["base_model"] \
        == "../base-4bit"
    for adapter in (step, run / "final"):
        assert Path(read_base_record(adapter)["base_model"]).resolve() == base.resolve()


def test_a_resume_that_changes_what_the_checkpoint_fixes_is_refused(tmp_path, monkeypatch):
    """`--set lora_rank=4` on resuming a full fine-tune failed on 'no optimizer state for
    parameter ...lora_A.weight (checkpoint from a different model?)'; `--set seed=5` was
    taken in silence and re-drew the rest of the epoch in another order."""
    monkeypatch.chdir(tmp_path)
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", *SMALL)
    state = "run/checkpoints/step-000001/trainer_state.json"
    for key, value, saved in (("lora_rank", "4", "0"), ("seed", "5", "0")):
        words = refused("train", "--resume", "run", "--set", "max_steps=2", "--set",
                        f"{key}={value}")
        assert f"{key}: cannot change on resume ({saved} in {state}, {value} asked)" in words
        assert f"--model run/checkpoints/step-000001 -o NEW_RUN --set {key}=" in words
    # what may change does: the learning rate, the data path on a new machine
    out = gft("train", "--resume", "run", "--set", "max_steps=2", "--set", "seed=0",
              "--set", "learning_rate=1e-4", "--data", "run/task")
    assert "(step 1)" in out and "final checkpoint" in out


def test_resuming_on_data_with_another_row_count_says_so(tmp_path, monkeypatch):
    """--data on a resume (the data moved) took any file in silence, also one with other
    rows, whose seeded order the saved data position does not count."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": f"Q{i}: say yes\nA:", "completion": " yes"} for i in range(6)]
    Path("train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Path("moved.jsonl").write_text(Path("train.jsonl").read_text())
    Path("other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", "--data",
        "train.jsonl", *SMALL)
    out = gft("train", "--resume", "run", "--set", "max_steps=2", "--data", "moved.jsonl")
    assert "the run trained on" not in out  # the same rows at a new path
    out = gft("train", "--resume", "run", "--set", "max_steps=3", "--data", "other.jsonl")
    assert ("warning: other.jsonl has 4 training rows, the run trained on 6 up to its "
            "checkpoint (at row 4 of epoch 1)") in " ".join(out.split())


def test_a_run_on_chat_messages_is_prompted_with_the_chat_template(tmp_path, monkeypatch):
    """TRL's conversational rows are always rendered with the chat template; with
    chat_template unset, `gft generate runs/x/final -p TEXT` sent the string raw, a
    prompt unlike every one the model trained on."""
    from gft.trained import trained_chat_template
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": f"{i + 1}"}]} for i in range(2)]
    Path("chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", "--data", "chat.jsonl",
        *SMALL)
    assert yaml.safe_load(Path("run/config.yaml").read_text())["chat_template"] is None
    assert trained_chat_template("run/final") is True


def test_eval_data_and_reward_files_left_behind_say_how_to_give_their_new_place(
        tmp_path, monkeypatch):
    """A run copied without the eval_data and reward files it names (absolute paths on
    the first machine) stopped on 'reward file not found: /...' or 'eval_data: no such
    file or directory', neither naming the key to set on the resume."""
    start = tmp_path / "project"
    start.mkdir()
    monkeypatch.chdir(start)
    Path("r.py").write_text("def f(completions, **kw):\n    return [1.0 for c in completions]\n")
    rows = [{"prompt": f"Q{i}: say yes\nA:", "completion": " yes"} for i in range(4)]
    for name in ("train.jsonl", "held.jsonl"):
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    gft("train", "-o", "run", "--backend", "torch", "--max-steps", "1", "--data", "train.jsonl",
        *SMALL, "--set", "rewards=[r.py:f]", "--set", "eval_data=held.jsonl")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(start, elsewhere)
    shutil.rmtree(start)
    monkeypatch.chdir(elsewhere)
    resume = ["train", "--resume", "run", "--set", "max_steps=2", "--data", "train.jsonl"]
    words = refused(*resume)
    assert f"eval_data '{start / 'held.jsonl'}' is not on this machine" in words
    assert "--set eval_data=" in words
    words = refused(*resume, "--set", "eval_data=held.jsonl")
    assert f"rewards '{start / 'r.py'}' is not on this machine" in words
    assert "--set rewards=" in words
    out = gft(*resume, "--set", "eval_data=held.jsonl", "--set", "rewards=[r.py:f]")
    assert "(step 1)" in out and "final checkpoint" in out
