"""A reward model as a reward (gft/rewardmodel.py), as TRL's GRPOTrainer takes one in
reward_funcs: a tiny Llama sequence classifier saved by transformers itself scores each
prompt + response with its first logit, batched and right-padded, exactly as one text at
a time scores it; a chat goes through the reward model's chat template; a folder that is
not a reward model is refused before it could score noise; and a run trains with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from click.testing import CliRunner  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification  # noqa: E402

from cli import main  # noqa: E402
from gft.errors import RewardError  # noqa: E402
from gft.metrics import read_metrics  # noqa: E402
from gft.rewards import build_rewards  # noqa: E402
from gft.runpaths import map_reward_files  # noqa: E402
from gft.tiny import BOS_ID, EOS_ID, PAD_ID, TinyModelSpec, save_tokenizer, write_tiny_model  # noqa: E402


def save_reward_model(path: Path, pad: bool = True) -> Path:
    """What TRL's RewardTrainer leaves: a ...ForSequenceClassification with one label."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, num_labels=1, bos_token_id=BOS_ID,
                         eos_token_id=EOS_ID, pad_token_id=PAD_ID if pad else None)
    LlamaForSequenceClassification(config).save_pretrained(path)
    save_tokenizer(path)
    if not pad:  # a tokenizer without a pad token: batches are padded with EOS, as TRL does
        tok = AutoTokenizer.from_pretrained(path)
        tok.pad_token = None
        tok.save_pretrained(path)
    return path


def one_at_a_time(path: Path, texts: list[str]) -> list[float]:
    """Each text alone: no padding, nothing batched."""
    model = LlamaForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [float(model(**tok(t, return_tensors="pt", add_special_tokens=False))
                      .logits[0, 0]) for t in texts]


@pytest.mark.parametrize("pad", [True, False])
def test_batched_scores_equal_each_text_scored_alone(tmp_path, pad):
    rm = save_reward_model(tmp_path / "rm", pad)
    prompts = ["Q: 2+2?\nA:", "Q: name a colour\nA:", "Q:"]
    completions = [" 4", " a long answer that pads the others", "?"]
    scorer = build_rewards([{"name": str(rm), "batch_size": 2}])
    got = scorer.score(prompts, completions, {}).total
    want = one_at_a_time(rm, [p + c for p, c in zip(prompts, completions)])
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert len(set(want)) == 3  # the texts do score differently: the test can tell them apart
    assert scorer.log_names == ["rm"]  # metrics name it by its last part, as TRL does


def test_a_chat_is_scored_through_the_reward_models_chat_template(tmp_path):
    rm = save_reward_model(tmp_path / "rm")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    got = build_rewards([str(rm)]).score([prompt], ["Hello!"], {}).total
    tok = AutoTokenizer.from_pretrained(rm)
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Hello!"}],
                                   tokenize=False)
    assert got.tolist() == pytest.approx(one_at_a_time(rm, [text]), abs=1e-5)


def test_a_causal_lm_folder_is_refused_as_a_reward_model(tmp_path):
    lm = write_tiny_model(tmp_path / "lm", TinyModelSpec(seed=0))
    with pytest.raises(RewardError, match=r"holds LlamaForCausalLM, not a reward model .* "
                                          "its score head would be random"):
        build_rewards([str(lm)])


def test_reward_model_options_are_checked(tmp_path):
    rm = save_reward_model(tmp_path / "rm")
    with pytest.raises(Exception, match="unknown option.*temperature.*it takes: batch_size"):
        build_rewards([{"name": str(rm), "temperature": 0.5}])
    with pytest.raises(RewardError, match="batch_size must be a positive integer"):
        build_rewards([{"name": str(rm), "batch_size": 0}])


def test_a_hub_id_that_cannot_be_fetched_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RewardError) as info:
        build_rewards(["someorg/RM-Tiny"])
    assert str(info.value).startswith("reward 'someorg/RM-Tiny': someorg/RM-Tiny: no such "
                                      "folder") and "\n" not in str(info.value)


def test_a_reward_model_folder_moves_with_the_run_but_a_builtin_never(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math").mkdir()  # a folder named like a built-in reward
    raw = ["math", "./rm", {"name": "org/hub-rm", "weight": 0.5}, "rewards.py:f"]
    assert map_reward_files(raw, lambda p: f"MOVED({p})") == [
        "math", "MOVED(./rm)", {"name": "org/hub-rm", "weight": 0.5}, "MOVED(rewards.py):f"]


def test_a_run_trains_with_a_reward_model(tmp_path):
    model = write_tiny_model(tmp_path / "model", TinyModelSpec(seed=0))
    rm = save_reward_model(tmp_path / "rm")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": " yes"}) + "\n"
                            for i in range(4)))
    result = CliRunner().invoke(main, [
        "train", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "run"),
        "--backend", "torch", "--max-steps", "1", "--set", "preset=grpo",
        "--set", f"rewards=[{rm}]", "--set", "prompts_per_step=2",
        "--set", "prompts_per_minibatch=2", "--set", "num_rollouts=2",
        "--set", "max_response_tokens=4", "--set", "eval_samples=0",
        "--set", "progress=false"])
    assert result.exit_code == 0, (result.output, result.exception)
    step = next(r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["step"] == 1)
    assert "rewards/rm/rollout" in step and step["reward/rollout"] != 0.0


def test_a_reward_model_folder_that_is_not_there_says_so(tmp_path):
    """A run copied to another machine names a reward model folder that is elsewhere
    there; it was 'unknown reward', as if the name were a typo of a built-in."""
    with pytest.raises(RewardError, match=r"^reward '.*/gone': no such folder \(a reward "
                                          "model is a folder with config.json"):
        build_rewards([str(tmp_path / "gone")])
