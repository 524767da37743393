"""The PyTorch backend on a tiny random Llama: accumulation, dtypes, sampling, state."""
import json

import numpy as np
import pytest
import torch

from backends import OptimConfig, SamplingConfig, load_backend
from gft.groups import Sequence_, micro_batches, pad_batch
from gft.tiny import EOS_ID, PAD_ID, TinyModelSpec, write_tiny_model
from tests.helpers import assert_same_update, shared_prompt_group


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("m") / "model", TinyModelSpec(seed=3))


def _seqs():
    rng = np.random.default_rng(0)
    out = []
    for g, (p, r, a) in enumerate([(5, 4, 1.0), (3, 7, -0.5), (6, 2, 0.25), (4, 5, 2.0)]):
        s = Sequence_(g, rng.integers(0, 256, p).tolist(), rng.integers(0, 256, r).tolist(), "",
                      on_policy=True)
        s.advantage = a
        out.append(s)
    return out


def _grads(backend, batches):
    backend.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
    return backend.gradients()


def test_micro_batches_accumulate_to_the_full_batch_gradient(model_dir):
    be = load_backend("torch", str(model_dir))
    seqs = _seqs()
    one = micro_batches(seqs, 8, 256)
    two = micro_batches(seqs, 2, 256)
    assert len(one) == 1 and len(two) == 2
    g1, g2 = _grads(be, one), _grads(be, two)
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    plain = load_backend("torch", str(model_dir))
    ckpt = load_backend("torch", str(model_dir), gradient_checkpointing=True)
    batches = micro_batches(_seqs(), 4, 256)
    g1, g2 = _grads(plain, batches), _grads(ckpt, batches)
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_skipping_zero_advantage_keeps_the_loss(model_dir):
    # A = 0 rows are dropped from compute but still count in the token-mean denominator.
    be = load_backend("torch", str(model_dir))
    seqs = _seqs()
    seqs[1].advantage = 0.0
    kept = micro_batches(seqs, 8, 256, skip_zero_advantage=False)
    skipped = micro_batches(seqs, 8, 256, skip_zero_advantage=True)
    assert skipped[0].input_ids.shape[0] == 3
    a = be.accumulate_gradients(kept, tau=0.1, aggregation="token-mean")["loss"]
    b = be.accumulate_gradients(skipped, tau=0.1, aggregation="token-mean")["loss"]
    assert a == pytest.approx(b, rel=1e-6)


def test_bfloat16_trains_and_saves_bfloat16(model_dir, tmp_path):
    be = load_backend("torch", str(model_dir), dtype="bfloat16")
    stats = be.train_step(micro_batches(_seqs(), 4, 256), 1e-3, tau=0.1, aggregation="token-mean")
    assert np.isfinite(stats["loss"]) and not stats["skipped"]
    be.save_model(tmp_path / "out")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0  # portable config: top-level rope_theta


def test_sampling_is_seeded_and_stops_at_eos(model_dir):
    be = load_backend("torch", str(model_dir))
    prompts = [[72, 105], [1, 2, 3, 4, 5], [9]]
    s = SamplingConfig(max_new_tokens=12, temperature=1.0)
    a, b = be.generate(prompts, s, seed=7), be.generate(prompts, s, seed=7)
    assert a == b
    assert be.generate(prompts, s, seed=8) != a
    for out in a:
        assert 1 <= len(out) <= 12
        assert 258 not in out[:-1]  # nothing after the first EOS


def test_greedy_ignores_left_padding(model_dir):
    be = load_backend("torch", str(model_dir))
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    prompts = [[72, 105, 33], [1, 2, 3, 4, 5, 6, 7]]
    batched = be.generate(prompts, greedy, seed=0)
    alone = [be.generate([p], greedy, seed=0)[0] for p in prompts]
    assert batched == alone


def test_optimizer_state_round_trips(model_dir, tmp_path):
    be = load_backend("torch", str(model_dir), optim=OptimConfig(weight_decay=0.01))
    batches = micro_batches(_seqs(), 4, 256)
    be.train_step(batches, 1e-3, tau=0.1, aggregation="token-mean")
    be.save_optimizer(tmp_path / "opt.safetensors")
    be.save_model(tmp_path / "m")
    other = load_backend("torch", str(tmp_path / "m"), optim=OptimConfig(weight_decay=0.01))
    other.load_optimizer(tmp_path / "opt.safetensors")
    be.train_step(batches, 1e-3, tau=0.1, aggregation="token-mean")
    other.train_step(batches, 1e-3, tau=0.1, aggregation="token-mean")
    a, b = be.named_parameters(), other.named_parameters()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_non_finite_loss_skips_the_update(model_dir):
    be = load_backend("torch", str(model_dir))
    before = be.named_parameters()
    seqs = _seqs()
    seqs[0].advantage = float("inf")
    stats = be.train_step([pad_batch(seqs, 256, 10.0, 4.0)], 1e-3, tau=0.1,
                          aggregation="token-mean")
    assert stats["skipped"] == 1.0
    after = be.named_parameters()
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_logits_only_from_the_first_response_position_change_nothing(model_dir):
    """The update asks the model for logits from the position before the earliest response
    token on (gft/groups.py scored_from): same loss, entropy and gradients as
    logits everywhere, up to float rounding."""
    batches = micro_batches(_seqs(), 4, 256)
    from gft.groups import scored_from
    assert scored_from(batches[0]) == 2  # shortest prompt: 3 tokens -> logits from 2 on
    be = load_backend("torch", str(model_dir))
    trimmed = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
    g_trim = be.gradients()
    be._keeps_logits = False  # the reference: full [B, L, V] logits
    full = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
    g_full = be.gradients()
    assert trimmed["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert trimmed["entropy"] == pytest.approx(full["entropy"], rel=1e-6)
    assert trimmed["tokens"] == full["tokens"]
    for name in g_full:
        np.testing.assert_allclose(g_trim[name], g_full[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)


class FakeEngine:
    """A rollout engine that answers from a script and records what the backend asks."""

    def __init__(self):
        self.calls: list[tuple[int, list[int]]] = []  # (syncs so far, seeds) per generate
        self.syncs = 0

    def generate(self, prompts, sampling, seeds):
        self.calls.append((self.syncs, list(seeds)))
        return [[65 + i % 3, EOS_ID] for i in range(len(prompts))]  # "A"/"B"/"C" then EOS

    def sync(self):
        self.syncs += 1


def test_the_rollout_engine_is_a_protocol_synced_after_each_update(model_dir, tmp_path):
    """The loop does not change with the engine: rollouts come from it, and it is synced
    once before the first rollout after updates (never before the first step)."""
    from gft.config import build_config
    from gft.loop import train_step
    from gft.rewards import build_rewards
    from gft.rollout import prepare_prompts
    from gft.types import Example
    be = load_backend("torch", str(model_dir))
    be.rollout_engine = fake = FakeEngine()
    rows = [Example(f"q{i}", responses=["A"], answer="A") for i in range(4)]
    data = prepare_prompts(rows, be.tokenizer, chat_template=False, max_prompt_tokens=64,
                           overflow="error")
    cfg = build_config({"preset": "gft", "num_offpolicy": 1, "num_rollouts": 3,
                        "prompts_per_step": 4, "prompts_per_minibatch": 2,
                        "rewards": ["exact"], "max_response_tokens": 4}, None)
    scorer = build_rewards(cfg.rewards)
    m1 = train_step(cfg, be, data, [0, 1, 2, 3], scorer, 0, lambda i: 1e-3)
    m2 = train_step(cfg, be, data, [0, 1, 2, 3], scorer, 1, lambda i: 1e-3)
    assert m1["updates"] == m2["updates"] == 2.0            # two updates per step
    assert [c[0] for c in fake.calls] == [0, 1]             # one sync between the steps
    assert len(fake.calls[0][1]) == 12 and fake.calls[0][1] != fake.calls[1][1]
    assert m1["accuracy/rollout"] == pytest.approx(4 / 12)  # "A" in 1 of every 3 rollouts


def test_bfloat16_engine_samples_from_the_rounded_current_policy(model_dir):
    from backends.torch_sampler import sample
    be = load_backend("torch", str(model_dir), rollout_engine="bfloat16")
    shadow = be.rollout_engine.shadow
    assert all(p.dtype == torch.bfloat16 for p in shadow.parameters())
    assert all(p.dtype == torch.float32 for p in be.model.parameters())
    be.train_step(micro_batches(_seqs(), 4, 256), 1e-2, tau=0.1, aggregation="token-mean")
    prompts = [[1, 2, 3], [4, 5]]
    greedy = SamplingConfig(max_new_tokens=6, greedy=True)
    out = be.generate(prompts, greedy, 0)  # syncs first: the update reaches the copy
    for dst, src in zip(shadow.parameters(), be.model.parameters()):
        torch.testing.assert_close(dst, src.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert out == sample(shadow, prompts, max_new_tokens=6, greedy=True, eos_id=EOS_ID,
                         pad_id=PAD_ID)


@pytest.mark.parametrize("setup", ["plain", "lora", "bfloat16 engine", "mixed precision"])
def test_rollout_graphs_follow_the_optimizer_updates_without_recompiling(model_dir, setup):
    """rollout_graphs: on: rollouts through the compiled step equal eager ones, before and
    after an update, from one compiled graph (the update changes weights in place, which
    the step reads where they are), with adapters, from a bfloat16 copy and under
    autocast too."""
    from gft.lora import LoraConfig
    from tests.helpers import CountingCompiler
    kw = {"plain": {}, "lora": {"lora": LoraConfig(rank=4, alpha=64.0)},
          "bfloat16 engine": {"rollout_engine": "bfloat16"},
          "mixed precision": {"mixed_precision": True}}[setup]
    on = load_backend("torch", str(model_dir), rollout_graphs="on", **kw)
    off = load_backend("torch", str(model_dir), rollout_graphs="off", **kw)
    assert off.rollout_engine.graphs is None
    counter = CountingCompiler()
    on.rollout_engine.graphs.mode, on.rollout_engine.graphs.backend = None, counter
    prompts, s = [[1, 2, 3], [4, 5], [6]], SamplingConfig(max_new_tokens=10, temperature=1.0)
    before = on.generate(prompts, s, 4)
    assert before == off.generate(prompts, s, 4)
    for be in (on, off):
        be.train_step(micro_batches(_seqs(), 4, 256), 5e-2, tau=0.1, aggregation="token-mean")
    after = on.generate(prompts, s, 4)
    assert after == off.generate(prompts, s, 4) and after != before
    assert counter.graphs == 1 and on.rollout_engine.graphs.failure is None


def test_the_run_header_says_when_rollouts_compile(model_dir):
    on = load_backend("torch", str(model_dir), rollout_graphs="on")
    assert "first rollout of each batch shape compiles" in on.rollout_note
    assert "CUDA graph" not in on.rollout_note  # on the CPU it is compiled only
    assert load_backend("torch", str(model_dir)).rollout_note is None  # auto on a CPU: off


def test_mixed_precision_computes_in_bfloat16_over_float32_weights(model_dir):
    batches = micro_batches(_seqs(), 4, 256)
    ref = load_backend("torch", str(model_dir))
    mixed = load_backend("torch", str(model_dir), mixed_precision=True)
    a = ref.train_step(batches, 1e-3, tau=0.1, aggregation="token-mean")
    b = mixed.train_step(batches, 1e-3, tau=0.1, aggregation="token-mean")
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert all(st["exp_avg"].dtype == torch.float32 for st in mixed.optimizer.state.values())
    assert b["loss"] != a["loss"]                         # bfloat16 matmuls did run
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)  # ... to bfloat16 accuracy
    out = mixed.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=4, greedy=True), 0)
    assert len(out[0]) == 4 or out[0][-1] == EOS_ID
    from gft.errors import ConfigError
    with pytest.raises(ConfigError, match="float32 master weights"):
        load_backend("torch", str(model_dir), dtype="bfloat16", mixed_precision=True)


@pytest.mark.parametrize("rows", [None, 3])
def test_token_logprobs_match_autograd_of_the_plain_formulas(monkeypatch, rows):
    """TokenLogProbs' hand-written backward (onehot - softmax, in place) against autograd
    through log_softmax, in float64; the entropy against its definition. rows=3: the
    10 positions go through the softmax in chunks of 3, 3, 3 and 1 (softmax_rows)."""
    import backends.torch_head as tb
    from backends.torch_head import TokenLogProbs, logprobs_and_entropy
    if rows is not None:
        monkeypatch.setattr(tb, "softmax_rows", lambda z: rows)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 7, (2, 5), generator=gen)
    weights = torch.randn(2, 5, generator=gen, dtype=torch.float64)

    z1 = logits.clone().requires_grad_(True)
    logp, entropy = TokenLogProbs.apply(z1, targets)
    (logp * weights).sum().backward()

    z2 = logits.clone().requires_grad_(True)
    ref = torch.log_softmax(z2, -1)
    (ref.gather(-1, targets[..., None]).squeeze(-1) * weights).sum().backward()
    probs = ref.detach().exp()
    assert torch.allclose(logp, ref.gather(-1, targets[..., None]).squeeze(-1), atol=1e-12)
    assert torch.allclose(entropy, -(probs * ref.detach()).sum(-1), atol=1e-12)
    assert not entropy.requires_grad
    assert torch.allclose(z1.grad, z2.grad, atol=1e-12)
    # the public helper returns the same thing (in float32 for float32 logits)
    lp32, _ = logprobs_and_entropy(logits.float(), targets)
    assert torch.allclose(lp32.double(), logp.detach(), atol=1e-5)


def rows_by_tokens(kw: dict) -> tuple[int, int]:
    """[B, T] of a model call, given ids or embeddings."""
    x = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
    return tuple(x.shape[:2])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_shared_prompt_runs_once_with_the_same_loss_and_gradients(tmp_path, arch):
    """Rows sharing their leading tokens: one row's forward fills a KV cache expanded to
    all rows (TorchBackend._prefix_shared_scores). Loss, entropy and every gradient equal
    the plain full-batch forward's; a shared system prompt before different questions
    counts too, and rows sharing fewer than MIN_SHARED_PREFIX tokens take the plain path."""
    from gft.groups import MIN_SHARED_PREFIX, shared_prefix
    model = write_tiny_model(tmp_path / arch, TinyModelSpec(arch=arch, seed=4))
    seqs = shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75])
    other = shared_prompt_group(12, [6, 4], [0.5, -1.0], seed=2)
    for s in other:  # same first 10 tokens (a "system prompt"), then another question
        s.prompt_ids = seqs[0].prompt_ids[:10] + s.prompt_ids[10:]
    mb = micro_batches(seqs + other, 8, 256)
    assert shared_prefix(mb[0], 100) == 10 >= MIN_SHARED_PREFIX
    assert shared_prefix(micro_batches(seqs, 8, 256)[0], 11) == 11  # capped at the limit
    for batches in (mb, micro_batches(seqs, 8, 256)):
        be = load_backend("torch", str(model))
        be._pack = False  # the two-forward path, where packing does not pay (torch_pack)
        calls = []
        be.model.get_decoder().register_forward_pre_hook(  # both heads call the decoder
            lambda mod, args, kw: calls.append(rows_by_tokens(kw)), with_kwargs=True)
        shared = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
        g_shared = be.gradients()
        assert calls[0][0] == 1, "the shared prefix should run as one row"
        be._share_prefix = False
        plain = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
        assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
        assert shared["entropy"] == pytest.approx(plain["entropy"], rel=1e-5)
        for name, g in be.gradients().items():
            np.testing.assert_allclose(g_shared[name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    # rows that share less than MIN_SHARED_PREFIX tokens: nothing to share
    short = shared_prompt_group(MIN_SHARED_PREFIX - 1, [4, 5], [1.0, -1.0])
    assert shared_prefix(micro_batches(short, 8, 256)[0], 100) < MIN_SHARED_PREFIX


def test_a_shared_prompt_runs_once_under_lora_too(tmp_path):
    """PEFT passes the cache, positions and logits_to_keep through to the base model."""
    from gft.lora import LoraConfig
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(seed=4))
    be = load_backend("torch", str(model), lora=LoraConfig(
        rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    be._pack = False  # the two-forward path (tests/test_torch_pack.py packs under LoRA)
    batches = micro_batches(shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]), 8, 256)
    calls = []
    be.model.get_base_model().get_decoder().register_forward_pre_hook(
        lambda mod, args, kw: calls.append(rows_by_tokens(kw)), with_kwargs=True)
    shared = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
    g_shared = be.gradients()
    assert calls[:2] == [(1, 11), (4, 10)]
    be._share_prefix = False
    plain = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
    assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
    for name, g in be.gradients().items():
        np.testing.assert_allclose(g_shared[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("max_norm", [0.5, 1e9, float("inf")])
@pytest.mark.parametrize("most", [1 << 22, 1000])
def test_clipping_matches_torch_clip_grad_norm(monkeypatch, max_norm, most):
    """most: the size above which a tensor's norm is a dot product (1000: two of the three
    here) rather than part of the one _foreach_norm."""
    import backends.torch_backend as tb
    from backends.torch_backend import clip_gradients_
    monkeypatch.setattr(tb, "FOREACH_NORM_MOST", most)
    g = torch.Generator().manual_seed(0)
    shapes = [(300, 64), (64,), (1000, 3)]
    grads = [torch.randn(s, generator=g) * 0.05 for s in shapes]

    def params():
        ps = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        return ps + [torch.nn.Parameter(torch.zeros(3))]  # one without a gradient

    ours, ref = params(), params()
    norm = clip_gradients_(ours, max_norm)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
    exact = float(torch.cat([x.double().reshape(-1) for x in grads]).norm())
    assert norm == pytest.approx(exact, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
    assert 0.5 < exact < 1e9  # the first case clips, the others do not
    for a, b, raw in zip(ours, ref, grads):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        if max_norm > exact:  # not clipping leaves the gradients untouched, bit for bit
            assert torch.equal(a.grad, raw)
    assert ours[-1].grad is None


def test_clipping_bfloat16_gradients_goes_through_torch():
    from backends.torch_backend import clip_gradients_
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    p.grad = torch.full((4,), 2.0, dtype=torch.bfloat16)
    assert clip_gradients_([p], 1.0) == pytest.approx(4.0, rel=1e-2)
    assert float(p.grad.float().norm()) == pytest.approx(1.0, rel=1e-2)


def test_chunked_head_matches_autograd_of_the_plain_formulas():
    """ChunkedHead (logits made `chunk` rows at a time, again in the backward) against
    autograd through lm_head and log_softmax, float64: log p, entropy, and the gradients
    of the hidden states and of the weight. 11 positions in chunks of 4: 4, 4, 3."""
    from backends.torch_head import head_logprobs
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 11, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 9, (1, 11), generator=gen)
    weights = torch.randn(1, 11, generator=gen, dtype=torch.float64)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logp, entropy = head_logprobs(h1, w1, targets, chunk=4)
    (logp * weights).sum().backward()
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = torch.log_softmax(h2 @ w2.T, -1)
    picked = ref.gather(-1, targets[..., None]).squeeze(-1)
    (picked * weights).sum().backward()
    assert torch.allclose(logp, picked, atol=1e-12)
    assert torch.allclose(entropy, -(ref.exp() * ref).sum(-1).detach(), atol=1e-12)
    assert not entropy.requires_grad
    assert torch.allclose(h1.grad, h2.grad, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-12)


@pytest.mark.parametrize("arch,tied,share", [("llama", False, False), ("qwen2", True, False),
                                             ("llama", False, True)])
def test_chunked_logits_give_the_same_loss_entropy_and_gradients(tmp_path, arch, tied, share):
    """The update's head in chunks of 5 positions (logits_chunk=5: several chunks per
    micro-batch, the last one short) against the whole [B, T, V] logits at once
    (logits_chunk=0), float32: same loss, entropy and every gradient (lm_head's, or the
    tied embedding's, included); with a shared prompt the prefix path takes chunks too."""
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(arch=arch, seed=5,
                                                           tie_word_embeddings=tied))
    seqs = shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]) if share \
        else _seqs()
    batches = micro_batches(seqs, 2, 256)
    out = {}
    for chunk in (5, 0):
        be = load_backend("torch", str(model), logits_chunk=chunk)
        assert (be._split is not None) == (chunk > 0)
        assert be._share_prefix
        stats = be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
        out[chunk] = stats, be.gradients()
    assert_same_update(out[5], out[0])


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_token_logprobs_equal_the_whole_logits(tmp_path, tied):
    """Evaluation's log-probs (token_logprobs) through the head in chunks of 5 positions
    against the whole [B, L, V] logits: the same numbers (float32)."""
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(arch="llama", seed=5,
                                                           tie_word_embeddings=tied))
    batch = micro_batches(_seqs(), 8, 256)[0]
    chunked = load_backend("torch", str(model), logits_chunk=5)
    whole = load_backend("torch", str(model), logits_chunk=0)
    assert chunked._split is not None and whole._split is None
    a, b = chunked.token_logprobs(batch), whole.token_logprobs(batch)
    assert a.shape == b.shape == (batch.input_ids.shape[0], batch.input_ids.shape[1] - 1)
    assert batch.input_ids.size > 3 * 5  # several chunks
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_micro_batches_by_tokens_pack_short_sequences_together():
    """Sorted by length (prompt + response), packed greedily under both limits."""
    from gft.groups import pack_by_tokens
    seqs = shared_prompt_group(4, [2, 30, 3, 28, 1, 29], [1.0] * 6)  # lengths 6..34
    seqs.sort(key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    lengths = [[len(s.prompt_ids) + len(s.response_ids) for s in run]
               for run in pack_by_tokens(seqs, 8, budget=70)]
    # 3 short rows (3 x 7 = 21 padded tokens), then 32 + 33 (2 x 33 = 66), then 34 alone
    assert lengths == [[5, 6, 7], [32, 33], [34]]
    assert [len(r) for r in pack_by_tokens(seqs, 4)] == [4, 2]  # no budget: by count
    assert [len(r) for r in pack_by_tokens(seqs, 8, budget=10)] == [1, 1, 1, 1, 1, 1]


def test_micro_batches_by_tokens_give_the_same_loss_and_gradients(model_dir):
    """4 short + 4 long sequences: one padded micro-batch of 8 against micro_batch_tokens
    micro-batches (fewer padded tokens): same loss, entropy and gradients."""
    seqs = shared_prompt_group(10, [3, 40, 5, 38, 2, 41, 4, 39],
                               [1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 0.75, -0.25])
    one = micro_batches(seqs, 8, 256)
    packed = micro_batches(seqs, 8, 256, micro_batch_tokens=120)
    assert len(one) == 1 and len(packed) > 1
    assert sum(b.input_ids.size for b in packed) < one[0].input_ids.size
    be = load_backend("torch", str(model_dir))
    s1, g1 = be.accumulate_gradients(one, tau=0.1, aggregation="seq-mean-token-mean"), \
        be.gradients()
    s2, g2 = be.accumulate_gradients(packed, tau=0.1, aggregation="seq-mean-token-mean"), \
        be.gradients()
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
    assert s2["entropy"] == pytest.approx(s1["entropy"], rel=1e-5)
    assert s2["tokens"] == s1["tokens"]
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_clipping_dispatches_the_same_few_operators_for_any_number_of_tensors():
    """A dot product per gradient dispatched 3 operators per tensor (816 for SmolLM2's
    272); one _foreach_norm does not grow with the tensor count."""
    from backends.torch_backend import clip_gradients_
    from benchmarks.worker import OpCounter

    def count(k):
        ps = [torch.nn.Parameter(torch.zeros(8, 8)) for _ in range(k)]
        for p in ps:
            p.grad = torch.ones(8, 8)
        with OpCounter() as ops:
            clip_gradients_(ps, 1.0)
        return ops.counts.total()
    assert count(3) == count(30) < 15


@pytest.mark.parametrize("options, words", [
    ({"dtype": "bfloat16", "mixed_precision": True}, "mixed_precision keeps float32"),
    ({"parallel": "fsdp", "world": 2, "lora": "LORA"}, "parallel: fsdp with LoRA"),
    ({"parallel": "fsdp", "world": 2, "rollout_engine": "bfloat16"},
     "rollout_engine: bfloat16 needs the whole model"),
])
def test_options_that_cannot_go_together_are_refused_before_loading(tmp_path, options, words):
    """fsdp with LoRA (or a bfloat16 rollout copy) was refused only after the model had
    loaded: minutes on a real model, for a config error. Here the model does not even
    exist: the config error must come first."""
    from backends.torch_backend import load
    from gft.errors import ConfigError
    from gft.lora import LoraConfig
    if options.get("lora") == "LORA":
        options = {**options, "lora": LoraConfig(rank=4, alpha=8.0)}
    with pytest.raises(ConfigError, match=words):
        load(str(tmp_path / "no-such-model"), **options)
