"""Data sets named by their Hugging Face Hub id (gft/hubdata.py): `data: org/name` or
`org/name:config`, loaded with `datasets.load_dataset` as TRL's and mlx-lm's scripts do.

No hub is reachable here, so the tests that train put a DatasetDict in place of
`datasets.load_dataset` (recording what it was asked); one test runs the real
`load_dataset` offline, where it must fail in one line naming the id.
What is checked:
- which texts read as hub ids (org/name, name, org/name:config) and which are paths;
- `gft train --data org/name:config` trains on its "train" split, evaluates on its
  "test" split, and stores the id as given in config.yaml (a copied run resumes from it);
- a bad row names the id, the split and the row; a missing split lists the data set's;
- offline, without a cached copy, the error is one line, not a traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

datasets = pytest.importorskip("datasets")
from click.testing import CliRunner  # noqa: E402

from cli import main  # noqa: E402
from gft.data import load_split  # noqa: E402
from gft.errors import DataError  # noqa: E402
from gft.hubdata import hub_id  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": f" {i + 1}", "answer": str(i + 1)}
            for i in range(start, start + n)]


@pytest.fixture
def hub(monkeypatch) -> list:
    """datasets.load_dataset answering for one hub data set; the calls it got."""
    calls: list = []
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(8)),
                                   "test": datasets.Dataset.from_list(rows(3, 100))})

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        if path != "someone/arith":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return splits
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_which_texts_are_hub_ids():
    assert hub_id("openai/gsm8k") == ("openai/gsm8k", None)
    assert hub_id("openai/gsm8k:main") == ("openai/gsm8k", "main")
    assert hub_id("gsm8k") == ("gsm8k", None)
    assert hub_id("AI-MO/NuminaMath-1.5") == ("AI-MO/NuminaMath-1.5", None)  # a dot in a name
    for path in ("train.jsonl", "data/train.jsonl.gz", "data/train.JSONL", "data/rows.tsv",
                 "data/train.csv.gz", "a/b/c", "./data", "/abs/data", "~/data", "org/name:"):
        assert hub_id(path) is None, path


def test_a_hub_data_set_trains_evaluates_and_is_stored_as_its_id(hub, tmp_path,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [
        "train", "--data", "someone/arith:default", "--preset", "sft", "--max-steps", "1",
        "-o", "run", "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
        "--set", "eval_samples=3", "--set", "rewards=[exact]", "--set", "progress=false",
        "--set", "max_response_tokens=8"])
    assert result.exit_code == 0, result.output
    assert ("someone/arith", "default") in hub
    assert "the 'test' split of someone/arith:default" in result.output
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"] == "someone/arith:default"
    evaluation = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl")
                  .read_text().splitlines() if "eval/n" in line]
    assert evaluation and evaluation[-1]["eval/n"] == 3  # the test split's rows
    again = CliRunner().invoke(main, ["train", "--resume", "run", "--max-steps", "2"])
    assert again.exit_code == 0, again.output  # the stored id resolves as the hub's again
    assert hub[-1] == ("someone/arith", "default") and "step 2/2" in again.output


def test_eval_data_may_be_a_hub_data_set_too(hub, tmp_path, monkeypatch):
    """eval_data: org/name beside local training data (was 'no such file or directory')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(4)))
    result = CliRunner().invoke(main, [
        "train", "--data", "train.jsonl", "--preset", "sft", "--max-steps", "1", "-o", "run",
        "--set", "eval_data=someone/arith", "--set", "prompts_per_step=4",
        "--set", "prompts_per_minibatch=4", "--set", "eval_samples=3",
        "--set", "rewards=[exact]", "--set", "progress=false",
        "--set", "max_response_tokens=8"])
    assert result.exit_code == 0, result.output
    assert "evaluation: 3 held-out rows from eval_data someone/arith" in result.output
    assert hub == [("someone/arith", None)]


def test_hub_rows_and_splits_are_named_in_errors(hub, monkeypatch):
    assert [e.answer for e in load_split("someone/arith", "test")] == ["101", "102", "103"]
    assert load_split("someone/arith", "valid", required=False) == []
    with pytest.raises(DataError, match=r"no 'valid' split; the data set has: test, train"):
        load_split("someone/arith", "valid")
    bad = datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"prompt": "1+1=", "answer": "2"}, {"prompt": None, "answer": "3"}])})
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: bad)
    with pytest.raises(DataError, match=r"someone/arith\[train\]:1"):
        load_split("someone/arith", "train")
    with pytest.raises(DataError, match="no such file or directory"):
        load_split("./someone/arith", "train")  # written as a path: never the hub


def test_offline_without_a_cached_copy_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "gft", "train", "--data", "nobody/nothing-here", "--max-steps",
         "1", "-o", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: nobody/nothing-here: no such file or directory, and the "
                           "Hugging Face Hub did not give a data set of that id"), last
    assert "Traceback" not in result.stderr


def test_an_mlx_run_on_a_hub_model_reads_its_snapshot_and_keeps_its_id(tmp_path, monkeypatch):
    """`gft train --backend mlx --model mlx-community/...` (what mlx-lm users pass): mlx-lm
    loads local folders only, so the id is read from its snapshot in the Hugging Face
    cache; config.yaml and the adapter name the id, not this machine's cache, and the
    resume reads the snapshot again. (No hub here: snapshot_download is a stand-in that
    returns a local folder, as it returns the cache's.)"""
    pytest.importorskip("mlx_lm")
    import huggingface_hub
    from gft.tiny import write_tiny_model
    from tests.helpers import say_yes_data
    cached = write_tiny_model(tmp_path / "cache" / "snapshot")
    asked: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(repo_id) or str(cached))
    monkeypatch.chdir(tmp_path)
    data = say_yes_data(tmp_path / "data")
    common = ["--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
              "--set", "max_response_tokens=4", "--set", "eval_samples=0",
              "--set", "progress=false"]
    result = CliRunner().invoke(main, [
        "train", "--backend", "mlx", "--model", "someone/tiny-4bit", "--data", str(data),
        "--preset", "sft", "--max-steps", "1", "-o", "run", "--set", "lora_rank=4", *common])
    assert result.exit_code == 0, result.output
    assert asked == ["someone/tiny-4bit"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"] == \
        "someone/tiny-4bit"
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "someone/tiny-4bit"
    again = CliRunner().invoke(main, ["train", "--resume", "run", "--max-steps", "2"])
    assert again.exit_code == 0, again.output
    assert asked == ["someone/tiny-4bit"] * 2 and "step 2/2" in again.output


def test_an_mlx_run_from_an_adapter_over_a_hub_base_reads_the_bases_snapshot(tmp_path,
                                                                             monkeypatch):
    """`gft train --backend mlx --model ADAPTER` where the adapter names its base by Hub
    id (a PEFT adapter's base_model_name_or_path, mlx_lm.lora's `model`): the base went
    to mlx-lm as a folder ('No such file or directory: someone/tiny/config.json'). It is
    read from its snapshot, as a hub-id --model is; the run's adapters and its resume
    name the id. (torch needs nothing: transformers fetches a hub id itself.)"""
    pytest.importorskip("mlx_lm")
    import huggingface_hub
    from tests.helpers import say_yes_data
    from tests.test_cli import mlx_lm_adapter
    adapter, _ = mlx_lm_adapter(tmp_path / "project")
    (tmp_path / "project" / "base").rename(tmp_path / "snapshot")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "model": "someone/tiny"}))
    asked: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: asked.append(repo_id) or str(tmp_path / "snapshot"))
    monkeypatch.chdir(tmp_path)
    data = say_yes_data(tmp_path / "data")
    common = ["--data", str(data), "--preset", "sft", "--set", "prompts_per_step=4",
              "--set", "prompts_per_minibatch=4", "--set", "max_response_tokens=4",
              "--set", "eval_samples=0", "--set", "progress=false"]
    result = CliRunner().invoke(main, ["train", "--backend", "mlx", "--model", str(adapter),
                                       "--max-steps", "1", "-o", "mlx-lm-run", *common])
    assert result.exit_code == 0, result.output
    assert asked == ["someone/tiny"]
    peft = tmp_path / "mlx-lm-run" / "final"  # a PEFT adapter naming the id
    assert json.loads((peft / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "someone/tiny"
    result = CliRunner().invoke(main, ["train", "--backend", "mlx", "--model", str(peft),
                                       "--max-steps", "1", "-o", "peft-run",
                                       "--set", "save_every=1", *common])
    assert result.exit_code == 0, result.output
    assert asked == ["someone/tiny"] * 2
    again = CliRunner().invoke(main, ["train", "--resume", "peft-run", "--max-steps", "2"])
    assert again.exit_code == 0 and "step 2/2" in again.output, again.output
    assert asked == ["someone/tiny"] * 3
    result = CliRunner().invoke(main, ["generate", str(adapter), "-p", "1", "--backend", "mlx",
                                       "--max-new-tokens", "2"])
    assert result.exit_code == 0 and asked == ["someone/tiny"] * 4, result.output


def test_a_torch_run_from_an_adapter_over_a_hub_base_loads_it_by_id(tmp_path):
    """The same adapter on torch: transformers reads a hub id itself (here from a Hugging
    Face cache laid out as the hub fills it, offline); the run's adapter names the id."""
    import numpy as np
    from safetensors.numpy import save_file
    from gft.lora import LoraConfig, write_peft_config
    from gft.tiny import write_tiny_model
    from tests.helpers import say_yes_data
    repo = tmp_path / "hub" / "models--someone--tiny"
    write_tiny_model(repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = json.loads((repo / "snapshots" / "0123abc" / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{w}.weight": a
               for i in range(layers) for w, a in (("A", np.ones((4, d), np.float32)),
                                                   ("B", np.zeros((d, 4), np.float32)))},
              str(adapter / "adapter_model.safetensors"))
    write_peft_config(adapter, LoraConfig(4, 8.0, 0.0, ("q_proj",)), "someone/tiny")
    # a fresh process: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE on import
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([
        sys.executable, "-m", "gft", "train", "--backend", "torch", "--model", str(adapter),
        "--data", str(say_yes_data(tmp_path / "data")), "--preset", "sft", "--max-steps", "1",
        "-o", str(tmp_path / "run"), "--set", "prompts_per_step=4",
        "--set", "prompts_per_minibatch=4", "--set", "max_response_tokens=4",
        "--set", "eval_samples=0"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "someone/tiny"


def test_an_mlx_resume_with_a_local_base_given_does_not_fetch_the_adapters_hub_base(
        tmp_path, monkeypatch):
    """`gft train --resume RUN --model /local/base` on a LoRA run whose checkpoints name a
    Hub base: the local base is the base. The checkpoint's adapter was consulted first, so
    offline the resume failed and online it trained over the download instead."""
    import huggingface_hub
    from gft.config import build_config
    from gft.run import hub_snapshot
    checkpoint = tmp_path / "step-000002"
    checkpoint.mkdir()
    (checkpoint / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
         "base_model_name_or_path": "mlx-community/tiny-4bit"}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    base = tmp_path / "base"
    base.mkdir()

    def fetched(**kwargs):
        raise AssertionError(f"fetched {kwargs.get('repo_id')} from the Hub")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetched)
    cfg = build_config({"model": str(base), "backend": "mlx", "lora_rank": 4})
    assert hub_snapshot(cfg, checkpoint) is None
    # an adapter no longer where --model says: the checkpoint names the base (fetched)
    gone = build_config({"model": str(tmp_path / "gone-adapter"), "backend": "mlx",
                         "lora_rank": 4})
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: str(base) if kw["repo_id"] == "mlx-community/tiny-4bit"
                        else None)
    assert hub_snapshot(gone, checkpoint) == ("mlx-community/tiny-4bit", str(base))
