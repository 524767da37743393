"""Small builders shared by several test modules (models, token batches, toy data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gft.tiny import EOS_ID, TinyModelSpec, init_weights, write_safetensors, write_tiny_model
from gft.groups import Sequence_
from gft.types import TokenBatch


def scaled_tiny(path: Path, arch: str = "qwen2", tied: bool = False,
                dtype: str = "float32") -> Path:
    """gft.tiny's model with matrices x8, so greedy decoding does not just repeat."""
    spec = TinyModelSpec(arch=arch, tie_word_embeddings=tied)
    out = write_tiny_model(path, spec, dtype=dtype)
    weights = {k: v if k.endswith("norm.weight") else v * 8 for k, v in init_weights(spec).items()}
    write_safetensors(out / "model.safetensors", weights, dtype)
    return out


def batch(seed: int, B: int = 3, L: int = 14) -> TokenBatch:
    """Random ids (EOS last), responses from column 4, advantages 1, -0.5, 0.8."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, size=(B, L))
    ids[:, -1] = EOS_ID
    mask = np.zeros((B, L), np.float32)
    mask[:, 4:] = 1.0
    return TokenBatch(ids, np.ones((B, L), bool), mask, np.array([1.0, -0.5, 0.8][:B], np.float32),
                      n_tokens=float(mask.sum()), n_seqs=float(B))


def shared_prompt_group(prompt_len: int, response_lens: list[int], advantages: list[float],
                        seed: int = 1) -> list[Sequence_]:
    """Sequences that all share one random prompt (a GRPO group), responses of the given
    lengths (random tokens), with these advantages."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 256, prompt_len).tolist()
    out = []
    for r, a in zip(response_lens, advantages):
        s = Sequence_(0, prompt, rng.integers(0, 256, r).tolist(), "", on_policy=True)
        s.advantage = a
        out.append(s)
    return out


def _write_split(path: Path, rows: list[dict], n_train: int) -> Path:
    path.mkdir()
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
    (path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
    return path


def say_yes_data(path: Path) -> Path:
    """24 prompts 'Qi: say yes' (20 train, 4 test), completion ' yes'."""
    rows = [{"prompt": f"Q{i}: say yes\nA:", "completion": " yes", "answer": "yes"}
            for i in range(24)]
    return _write_split(path, rows, 20)


def yes_questions_data(path: Path) -> Path:
    """40 questions whose answer is always "yes" (32 train, 8 test): learnable in a few
    steps from random init, and the exact-match reward is 0 for a random model's bytes."""
    rows = [{"prompt": f"Question {i}: is {i} a number?\nA:", "completion": "yes",
             "answer": "yes"} for i in range(40)]
    return _write_split(path, rows, 32)


class CountingCompiler:
    """A torch.compile backend that counts the graphs it is given and runs them as traced
    (what inductor would compile and a GPU would replay as CUDA graphs)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def assert_same_update(got, want, rtol: float = 1e-4) -> None:
    """Two backends' (stats, gradients) of the same update, float32: loss, entropy and token
    count equal, and every gradient nonzero and equal within rtol (atol 1e-6)."""
    import pytest
    (s1, g1), (s0, g0) = got, want
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5, abs=1e-7)
    assert s1["entropy"] == pytest.approx(s0["entropy"], rel=1e-5)
    assert s1["tokens"] == s0["tokens"]
    for name in g0:
        assert np.abs(g0[name]).max() > 0, name
        np.testing.assert_allclose(g1[name], g0[name], rtol=rtol, atol=1e-6, err_msg=name)
