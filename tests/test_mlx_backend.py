"""The MLX backend agrees with the torch backend: same log-probs, loss, gradients, weights
after AdamW updates, greedy rollouts, checkpoints and optimizer files.

The tiny models are gft.tiny's random Llama / Qwen2 with every matrix scaled up by 8
(std 0.16 instead of 0.02): at std 0.02 the logits are nearly flat, greedy decoding just
repeats the last prompt token and no token clears tau, which would make the agreement
checks weak. Scaled, greedy rollouts vary and some of them stop at EOS.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from mlx.utils import tree_flatten  # noqa: E402

from backends import OptimConfig, SamplingConfig, load_backend  # noqa: E402
from gft.modelfiles import check_model_dir, check_optimizer_state  # noqa: E402
from gft.tiny import (EOS_ID, PAD_ID, TinyModelSpec, init_weights, write_safetensors,  # noqa: E402
                      write_tiny_model)
from gft.types import TokenBatch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
# tau near the median token probability of these random batches, so that both branches of
# the DCR coefficient (C = 1 above tau, C = p below) carry gradient.
LOSS = {"tau": 0.002, "aggregation": "token-mean"}
PROMPTS = [[257, 72, 105], [257, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74], [1, 2, 3, 4, 5], [9],
           [257, 50, 43, 51, 61], [43]]  # [9] (llama) and [43] (qwen2) stop at EOS early


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (absolute when b is zero)."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in b)


def write_scaled_model(path: Path, arch: str, tied: bool = True) -> Path:
    spec = TinyModelSpec(arch=arch, tie_word_embeddings=tied)
    out = write_tiny_model(path, spec)
    weights = {k: v if k.endswith("norm.weight") else v * 8
               for k, v in init_weights(spec).items()}
    write_safetensors(out / "model.safetensors", weights, "float32")
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-tiny")
    # tied embeddings on one, a separate lm_head on the other
    return {"llama": write_scaled_model(root / "llama", "llama", tied=True),
            "qwen2": write_scaled_model(root / "qwen2", "qwen2", tied=False)}


def both(path: Path, **kw):
    """The same directory loaded in the torch and the mlx backend."""
    pytest.importorskip("torch")
    return load_backend("torch", str(path), **kw), load_backend("mlx", str(path), **kw)


def make_batch(seed: int = 0, B: int = 4, L: int = 16, n_tokens: float | None = None,
               n_seqs: float | None = None) -> TokenBatch:
    """Right-padded rows of different lengths, response mask after a 4-token prompt,
    advantages of both signs and a zero."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(L // 2, L + 1, size=B)
    lengths[0] = L
    ids = np.full((B, L), PAD_ID, dtype=np.int64)
    att = np.zeros((B, L), dtype=bool)
    mask = np.zeros((B, L), dtype=np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, 256, size=n)
        ids[i, n - 1] = EOS_ID
        att[i, :n] = True
        mask[i, 4:n] = 1.0
    adv = np.array([1.0, -0.7, 0.0, 1.3, -1.1, 0.4][:B], dtype=np.float32)
    return TokenBatch(ids, att, mask, adv,
                      n_tokens=float(mask.sum()) if n_tokens is None else n_tokens,
                      n_seqs=float(B) if n_seqs is None else n_seqs)


def split_batch(batch: TokenBatch, at: int) -> list[TokenBatch]:
    """Two micro-batches keeping the whole batch's denominators."""
    def part(sl):
        return TokenBatch(batch.input_ids[sl], batch.attention[sl], batch.response_mask[sl],
                          batch.advantages[sl], batch.n_tokens, batch.n_seqs)
    return [part(slice(0, at)), part(slice(at, None))]


# ------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("arch,loss", [
    ("llama", LOSS),
    ("qwen2", {"tau": 1.0, "aggregation": "seq-mean-token-mean"}),  # DFT: C = p everywhere
    ("qwen2", {"tau": 0.0, "aggregation": "seq-mean-token-sum"})])  # SFT-style: C = 1
def test_logprobs_loss_and_gradients_match_torch(model_dirs, arch, loss):
    t, m = both(model_dirs[arch])
    batch = make_batch()
    att = batch.attention[:, 1:]
    lp_t, lp_m = t.token_logprobs(batch), m.token_logprobs(batch)
    assert lp_m.shape == lp_t.shape and lp_m.dtype == np.float32
    assert np.abs(lp_m - lp_t)[att].max() < 1e-5
    if loss is LOSS:  # both DCR branches are exercised
        p = np.exp(lp_t)[batch.response_mask[:, 1:] > 0]
        assert (p > LOSS["tau"]).any() and (p <= LOSS["tau"]).any()
    s_t, s_m = t.accumulate_gradients([batch], **loss), m.accumulate_gradients([batch], **loss)
    assert s_m["tokens"] == s_t["tokens"] == float(batch.response_mask[:, 1:].sum())
    assert s_m["loss"] == pytest.approx(s_t["loss"], rel=RTOL, abs=1e-7)
    assert s_m["entropy"] == pytest.approx(s_t["entropy"], rel=RTOL)
    assert max_rel_err(m.gradients(), t.gradients()) < RTOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_only_from_the_first_response_position_change_nothing(model_dirs, arch):
    """With the head split off (split_head: tied embedding for llama, lm_head for qwen2)
    the update computes logits from gft.groups.scored_from on: the same loss, entropy and
    gradients as logits everywhere."""
    from backends.mlx_backend import split_head
    m = load_backend("mlx", str(model_dirs[arch]))
    assert m._head is not None and split_head(m.model) is not None
    batch = make_batch()
    trimmed = m.accumulate_gradients([batch], **LOSS)
    g_trim = m.gradients()
    m._head = None  # the reference: full [B, L, V] logits
    full = m.accumulate_gradients([batch], **LOSS)
    assert trimmed["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-7)
    assert trimmed["entropy"] == pytest.approx(full["entropy"], rel=1e-5)
    assert trimmed["tokens"] == full["tokens"]
    assert max_rel_err(g_trim, m.gradients()) < 1e-4


@pytest.mark.parametrize("arch,share", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_chunked_logits_give_the_same_loss_entropy_and_gradients(model_dirs, tmp_path, arch,
                                                                  share):
    """The update's head in chunks of 5 positions under mx.checkpoint (logits_chunk=5:
    several chunks, the last one short) against the whole logits at once (logits_chunk=0),
    float32: same loss, entropy and gradients — the tied embedding or lm_head included — and the same as torch's chunked head; with a shared prompt too."""
    from gft.groups import micro_batches
    from tests.helpers import shared_prompt_group
    path = model_dirs[arch]
    batches = [make_batch()]
    if share:
        path = write_tiny_model(tmp_path / arch, TinyModelSpec(arch=arch, seed=4))
        batches = micro_batches(shared_prompt_group(12, [5, 9, 3, 7],
                                                    [1.0, -0.5, 0.25, -0.75]), 8, 256)
    out = {}
    for chunk in (5, 0):
        m = load_backend("mlx", str(path), logits_chunk=chunk)
        assert m._share_prefix and m._head is not None
        out[chunk] = m.accumulate_gradients(batches, **LOSS), m.gradients()
    (s5, g5), (s0, g0) = out[5], out[0]
    assert s5["loss"] == pytest.approx(s0["loss"], rel=1e-5, abs=1e-7)
    assert s5["entropy"] == pytest.approx(s0["entropy"], rel=1e-5)
    assert s5["tokens"] == s0["tokens"]
    head = "lm_head.weight" if "lm_head.weight" in g0 else "model.embed_tokens.weight"
    assert np.abs(g0[head]).max() > 0
    assert max_rel_err(g5, g0) < 1e-4
    t = load_backend("torch", str(path), logits_chunk=5)
    t.accumulate_gradients(batches, **LOSS)
    assert max_rel_err(g5, t.gradients()) < RTOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_token_logprobs_equal_the_whole_logits(model_dirs, arch):
    """Evaluation's log-probs through the head in chunks of 5 positions against the whole
    logits, and against torch's (float32)."""
    batch = make_batch()
    a = load_backend("mlx", str(model_dirs[arch]), logits_chunk=5).token_logprobs(batch)
    b = load_backend("mlx", str(model_dirs[arch]), logits_chunk=0).token_logprobs(batch)
    t = load_backend("torch", str(model_dirs[arch]), logits_chunk=5).token_logprobs(batch)
    assert a.shape == b.shape == (4, 15)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    real = batch.attention[:, 1:]  # padding: MLX's causal mask alone, torch's attention mask
    np.testing.assert_allclose(a[real], t[real], rtol=1e-4, atol=1e-4)


def test_chunked_head_memory_does_not_grow_with_positions():
    """Peak memory of the head's forward + backward over a 4,096-token vocabulary: in one
    piece it grows with the positions (1,024 -> 4,096: x4 logits); in chunks of 128 it
    stays flat (one chunk's logits alive at a time, mlx_head._chunked) and under a quarter
    of the one-piece peak."""
    from backends.mlx_head import head_logprobs

    def peak(n, chunk):
        h = mx.random.normal((1, n, 64), key=mx.random.key(0))
        w = mx.random.normal((4096, 64), key=mx.random.key(1)) * 0.1
        t = mx.random.randint(0, 4096, (1, n), key=mx.random.key(2))
        mx.eval(h, w, t)
        loss = lambda h, w: mx.sum(head_logprobs(h, w, t, chunk)[0])  # noqa: E731
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(loss, argnums=(0, 1))(h, w))
        return mx.get_peak_memory() - base
    whole = [peak(n, 0) for n in (1024, 4096)]
    chunked = [peak(n, 128) for n in (1024, 4096)]
    assert whole[1] > 3 * whole[0]
    assert chunked[1] < 1.5 * chunked[0], chunked
    assert chunked[1] < whole[1] / 4, (chunked, whole)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_shared_prompt_runs_once_with_the_same_loss_and_gradients(tmp_path, arch,
                                                                     monkeypatch):
    """Rows sharing their first tokens: one row's forward fills PrefixKV caches that are
    broadcast to every row. Loss, entropy and gradients equal the plain forward's, and
    torch's (which shares the prefix its own way)."""
    from backends import mlx_backend
    from gft.groups import micro_batches
    from tests.helpers import shared_prompt_group
    model = write_tiny_model(tmp_path / arch, TinyModelSpec(arch=arch, seed=4))
    batches = micro_batches(shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]),
                            8, 256)
    expanded = []
    expand = mlx_backend.PrefixKV.expand
    monkeypatch.setattr(mlx_backend.PrefixKV, "expand",
                        lambda self, rows: (expanded.append(rows), expand(self, rows)))
    t, m = both(model)
    assert m._share_prefix
    shared = m.accumulate_gradients(batches, **LOSS)
    g_shared = m.gradients()
    assert expanded and set(expanded) == {4}, "the prefix should have been run once"
    m._share_prefix = False
    plain = m.accumulate_gradients(batches, **LOSS)
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
    assert shared["entropy"] == pytest.approx(plain["entropy"], rel=1e-5)
    assert max_rel_err(g_shared, m.gradients()) < 1e-4
    t.accumulate_gradients(batches, **LOSS)
    assert max_rel_err(g_shared, t.gradients()) < RTOL


def test_two_micro_batches_match_torch_and_one_batch(model_dirs):
    t, m = both(model_dirs["llama"])
    batch = make_batch(seed=1, B=5)
    s_t = t.accumulate_gradients(split_batch(batch, 2), **LOSS)
    s_m = m.accumulate_gradients(split_batch(batch, 2), **LOSS)
    g_two = m.gradients()
    assert s_m["loss"] == pytest.approx(s_t["loss"], rel=RTOL)
    assert s_m["tokens"] == s_t["tokens"]
    assert max_rel_err(g_two, t.gradients()) < RTOL
    s_one = m.accumulate_gradients([batch], **LOSS)
    assert s_one["loss"] == pytest.approx(s_m["loss"], rel=RTOL)
    assert s_one["entropy"] == pytest.approx(s_m["entropy"], rel=RTOL)
    assert max_rel_err(g_two, m.gradients()) < RTOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weights_match_torch_after_three_clipped_updates(model_dirs, arch):
    optim = OptimConfig(max_grad_norm=0.005, weight_decay=0.1)
    t, m = both(model_dirs[arch], optim=optim)
    start = {k: v.copy() for k, v in t.named_parameters().items()}  # torch's are views
    for i, lr in enumerate([1e-3, 3e-3, 5e-4]):
        mbs = split_batch(make_batch(seed=10 + i, B=4), 2)
        r_t, r_m = t.train_step(mbs, lr, **LOSS), m.train_step(mbs, lr, **LOSS)
        assert r_t["grad_norm"] > optim.max_grad_norm  # clipping is active
        assert r_m["grad_norm"] == pytest.approx(r_t["grad_norm"], rel=RTOL)
        assert r_m["skipped"] == r_t["skipped"] == 0.0
        assert r_m["loss"] == pytest.approx(r_t["loss"], rel=RTOL, abs=1e-7)
    w_t, w_m = t.named_parameters(), m.named_parameters()
    assert max_rel_err(w_m, w_t) < RTOL
    # The updates themselves agree too, not only the (much larger) weights. Measured over
    # all tensors together: a k_proj bias has a near-zero gradient (a constant added to
    # every key of a query cancels in the softmax; only RoPE breaks the symmetry), so Adam
    # scales its rounding noise up to a full-size step and per tensor it agrees to ~3e-4.
    upd_t = {k: w_t[k] - start[k] for k in start}
    upd_m = {k: w_m[k] - start[k] for k in start}
    assert min(np.linalg.norm(u) for u in upd_t.values()) > 0  # every tensor moved
    diff = np.sqrt(sum(np.sum((upd_m[k] - upd_t[k]) ** 2) for k in start))
    assert diff / np.sqrt(sum(np.sum(u ** 2) for u in upd_t.values())) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_generation_matches_torch(model_dirs, arch):
    t, m = both(model_dirs[arch])
    sampling = SamplingConfig(max_new_tokens=24, greedy=True, batch_size=4)
    out_t, out_m = t.generate(PROMPTS, sampling, 0), m.generate(PROMPTS, sampling, 0)
    assert out_m == out_t
    assert len(out_m) == len(PROMPTS)
    for row in out_m:  # cut after the first EOS, which is kept
        assert EOS_ID not in row[:-1]
        assert row[-1] == EOS_ID or len(row) == sampling.max_new_tokens
    assert any(row[-1] == EOS_ID for row in out_m)  # the EOS cut is exercised
    # The same prompts one at a time give the same rows: padding does not leak.
    alone = [m.generate([p], sampling, 0)[0] for p in PROMPTS]
    assert alone == out_m


def test_sampling_is_seeded_and_top_p_zero_is_greedy(model_dirs):
    m = load_backend("mlx", str(model_dirs["llama"]))
    hot = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a, b, c = m.generate(PROMPTS, hot, 7), m.generate(PROMPTS, hot, 7), m.generate(PROMPTS, hot, 8)
    assert a == b and a != c
    assert all(0 < len(r) <= 16 for r in a)
    tiny_p = SamplingConfig(max_new_tokens=16, temperature=0.7, top_p=1e-9)
    assert m.generate(PROMPTS, tiny_p, 3) == m.generate(PROMPTS, SamplingConfig(
        max_new_tokens=16, greedy=True), 0)


# ------------------------------------------------------------------------- state

def test_optimizer_state_crosses_backends(model_dirs, tmp_path):
    """torch -> mlx and mlx -> torch: the update after a resume is the same update."""
    optim = OptimConfig(max_grad_norm=0.05)
    t, _ = both(model_dirs["llama"], optim=optim)
    for i in range(2):
        t.train_step([make_batch(seed=20 + i)], 1e-3, **LOSS)
    t.save_model(tmp_path / "ckpt")
    t.save_optimizer(tmp_path / "ckpt" / "optimizer.safetensors")
    m = load_backend("mlx", str(tmp_path / "ckpt"), optim=optim)
    m.load_optimizer(tmp_path / "ckpt" / "optimizer.safetensors")
    assert m._step == 2
    nxt = [make_batch(seed=30)]
    t.train_step(nxt, 2e-3, **LOSS)
    m.train_step(nxt, 2e-3, **LOSS)
    assert max_rel_err(m.named_parameters(), t.named_parameters()) < RTOL

    # and back: mlx writes the checkpoint, torch resumes from it
    m.save_model(tmp_path / "back")
    m.save_optimizer(tmp_path / "back" / "optimizer.safetensors")
    check_model_dir(tmp_path / "back")  # the loop's own pre-resume checks accept it
    check_optimizer_state(tmp_path / "back")
    t2 = load_backend("torch", str(tmp_path / "back"), optim=optim)
    t2.load_optimizer(tmp_path / "back" / "optimizer.safetensors")
    t2.train_step([make_batch(seed=31)], 1e-3, **LOSS)
    m.train_step([make_batch(seed=31)], 1e-3, **LOSS)
    assert max_rel_err(m.named_parameters(), t2.named_parameters()) < RTOL


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_saved_model_loads_in_transformers_and_mlx(model_dirs, tmp_path, arch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = load_backend("mlx", str(model_dirs[arch]))
    m.train_step([make_batch(seed=40)], 1e-3, **LOSS)
    m.save_model(tmp_path / "out")
    out = tmp_path / "out"
    head = safetensors_header(out / "model.safetensors")
    assert head["__metadata__"] == {"format": "pt"}
    # tied embeddings: no lm_head.weight, as transformers saves them
    assert ("lm_head.weight" in head) == (arch == "qwen2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    assert AutoTokenizer.from_pretrained(out)("ab").input_ids == [97, 98]

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = make_batch(seed=41).input_ids[:, :12]
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(ids)).logits.numpy()
    mx_logits = np.array(m.model(mx.array(ids.astype(np.int32))))
    assert np.abs(hf_logits - mx_logits).max() < 1e-5
    again = load_backend("mlx", str(out))
    w_a, w_m = again.named_parameters(), m.named_parameters()
    assert all(np.array_equal(w_a[k], w_m[k]) for k in w_m)


def test_bfloat16_trains_and_saves_bfloat16(model_dirs, tmp_path):
    m = load_backend("mlx", str(model_dirs["llama"]), dtype="bfloat16")
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(m.model.parameters()))
    r = m.train_step([make_batch(seed=50)], 1e-3, **LOSS)
    assert r["skipped"] == 0.0 and np.isfinite(r["loss"])
    out = m.generate(PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9), 0)
    assert all(0 < len(row) <= 8 for row in out)
    m.save_model(tmp_path / "bf16")
    m.save_optimizer(tmp_path / "opt.safetensors")
    head = safetensors_header(tmp_path / "bf16" / "model.safetensors")
    assert {v["dtype"] for k, v in head.items() if k != "__metadata__"} == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = load_backend("mlx", str(tmp_path / "bf16"), dtype="bfloat16")
    again.load_optimizer(tmp_path / "opt.safetensors")
    w_a, w_m = again.named_parameters(), m.named_parameters()
    assert all(np.array_equal(w_a[k], w_m[k]) for k in w_m)


def test_non_finite_loss_and_empty_update_change_nothing(model_dirs, tmp_path):
    m = load_backend("mlx", str(model_dirs["llama"]))
    m.train_step([make_batch(seed=60)], 1e-3, **LOSS)
    before = m.named_parameters()
    m.save_optimizer(tmp_path / "before.safetensors")
    bad = make_batch(seed=61)
    bad.advantages[0] = np.nan
    r = m.train_step([bad], 1e-3, **LOSS)
    assert r["skipped"] == 1.0 and not np.isfinite(r["grad_norm"])
    assert m.apply_update(1e-3) == (0.0, False)  # gradients were dropped, not kept
    r = m.train_step([], 1e-3, **LOSS)
    assert r["tokens"] == 0.0 and r["grad_norm"] == 0.0 and r["skipped"] == 0.0
    after = m.named_parameters()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    m.save_optimizer(tmp_path / "after.safetensors")
    before_opt = (tmp_path / "before.safetensors").read_bytes()
    assert before_opt == (tmp_path / "after.safetensors").read_bytes()


def test_gradient_checkpointing_gives_the_same_gradients(model_dirs):
    batch = make_batch(seed=70)
    plain = load_backend("mlx", str(model_dirs["llama"]))
    ckpt = load_backend("mlx", str(model_dirs["llama"]), gradient_checkpointing=True)
    assert plain.accumulate_gradients([batch], **LOSS)["loss"] == pytest.approx(
        ckpt.accumulate_gradients([batch], **LOSS)["loss"], rel=1e-6)
    assert max_rel_err(ckpt.gradients(), plain.gradients()) < 1e-6
    # only the checkpointed model's layers were wrapped, and generation still works
    assert type(plain.model.layers[0]) is not type(ckpt.model.layers[0])
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    assert ckpt.generate(PROMPTS, greedy, 0) == plain.generate(PROMPTS, greedy, 0)


# ------------------------------------------------------------------------- no torch

NO_TORCH_CHILD = textwrap.dedent("""
    import importlib.abc, sys

    class HideTorch(importlib.abc.MetaPathFinder):
        # Wraps each finder so that torch is simply not found, as on a Mac without it:
        # importlib.util.find_spec("torch") is None (transformers asks that first) and
        # `import torch` raises ModuleNotFoundError.
        def __init__(self, inner):
            self.inner = inner
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None
        def find_distributions(self, *args, **kwargs):
            find = getattr(self.inner, "find_distributions", None)
            return find(*args, **kwargs) if find else iter(())
        def invalidate_caches(self):
            getattr(self.inner, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [HideTorch(f) for f in sys.meta_path]
    try:
        import torch
        raise SystemExit("torch still importable")
    except ImportError:
        pass

    import numpy as np
    import gft, backends, backends.mlx_backend
    from backends import SamplingConfig, load_backend
    from gft.types import TokenBatch

    be = load_backend("mlx", sys.argv[1])
    ids = np.array([[257, 72, 105, 33, 258, 256]])
    mask = np.array([[0, 0, 0, 1, 1, 0]], dtype=np.float32)
    batch = TokenBatch(ids, ids != 256, mask, np.ones(1, np.float32), 2.0, 1.0)
    stats = be.train_step([batch], 1e-3, tau=0.1, aggregation="token-mean")
    assert stats["skipped"] == 0.0, stats
    out = be.generate([[257, 72], [257, 65, 66]], SamplingConfig(max_new_tokens=5), 0)
    assert len(out) == 2
    leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    assert not leaked, leaked
    print("OK")
""")


def test_mlx_backend_runs_without_torch(model_dirs):
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", NO_TORCH_CHILD, str(model_dirs["llama"])],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_sample_next_draws_by_probability_inside_the_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05, top_p 0.7: tokens 0 and 1 stay, renormalised to
    # 0.625 / 0.375; with temperature 0.5 on (0.6, 0.4): 0.36 / 0.52 ≈ 0.69 for token 0.
    from backends import SamplingConfig
    from backends.mlx_sampler import sample_next
    u = mx.array(np.random.default_rng(0).random(4000).astype(np.float32))
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    toks = np.array(sample_next(logits, SamplingConfig(top_p=0.7), u))
    counts = np.bincount(toks, minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03
    logits = mx.log(mx.array([[0.6, 0.4]] * 4000))
    toks = np.array(sample_next(logits, SamplingConfig(temperature=0.5), u))
    assert abs((toks == 0).mean() - 0.36 / 0.52) < 0.03
