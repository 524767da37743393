"""The update's packed forward (backends/torch_pack.py): layout, when it applies, and the
same loss and gradients as the padded forward."""
import os

import numpy as np
import pytest

from backends import load_backend
from backends.torch_pack import (allowed, attention_pair_cost, grouped_query_sdpa, layout,
                                 packing_pays)
from benchmarks.worker import OpCounter
from gft.groups import Sequence_, micro_batches
from gft.tiny import TinyModelSpec, write_tiny_model
from tests.helpers import assert_same_update, shared_prompt_group


def test_layout_keeps_the_shared_prefix_once_and_each_row_apart():
    # rows of 5, 4 and 6 real tokens sharing their first 3: packed 3 + 2 + 1 + 3 = 9
    att = np.zeros((3, 6), bool)
    for b, n in enumerate([5, 4, 6]):
        att[b, :n] = True
    rows, cols, segment, index = layout(att, shared=3)
    assert rows.tolist() == [0, 0, 0, 0, 0, 1, 2, 2, 2]
    assert cols.tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]  # the position ids
    assert segment.tolist() == [-1, -1, -1, 0, 0, 1, 2, 2, 2]
    # row 1's columns 0-2 are the prefix, its column 3 is packed token 5, and its padding
    # (columns 4, 5) points at that last real token
    assert index[1].tolist() == [0, 1, 2, 5, 5, 5]
    assert index[2].tolist() == [0, 1, 2, 6, 7, 8]
    ok = allowed(segment)
    assert ok[6, :3].all() and ok[6, 6] and not ok[6, 3:6].any()  # prefix + itself only
    assert ok[4, 3] and not ok[3, 4]  # causal within a row
    assert not ok[1, 2]  # causal within the prefix
    # nothing shared: positions restart, the mask is block-diagonal
    rows, cols, segment, _ = layout(att, shared=0)
    assert cols.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    ok = allowed(segment)
    assert not ok[5, :5].any() and ok[5, 5] and ok[14, 9:15].all() and not ok[14, :9].any()


def test_packing_pays_for_short_rows_not_for_long_ones():
    """SmolLM2-135M's shape: 8 rows of a 45-token prompt + 64 tokens pack (557 tokens
    against 872 padded); 8 rows of 2,048 without a shared prefix do not (the dense mask's
    T^2 attention would cost more than the padding saves)."""
    from types import SimpleNamespace
    config = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                             head_dim=64, intermediate_size=1536)
    config.get_text_config = lambda decoder=True: config
    cost = attention_pair_cost(config)
    assert 3e-4 < cost < 3.5e-4
    assert packing_pays(np.ones((8, 109), bool), shared=45, pair_cost=cost)
    assert not packing_pays(np.ones((8, 1024), bool), shared=0, pair_cost=cost)
    assert not packing_pays(np.ones((1, 109), bool), shared=0, pair_cost=cost)  # one row


def test_grouped_query_switch_is_put_back():
    before = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    with grouped_query_sdpa():
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == before


def _mixed() -> list[Sequence_]:
    """Different prompts and lengths (nothing shared, much padding), advantages of both
    signs."""
    rng = np.random.default_rng(0)
    out = []
    for g, (p, r, a) in enumerate([(5, 4, 1.0), (3, 9, -0.5), (6, 2, 0.25), (4, 7, 2.0)]):
        out.append(Sequence_(g, rng.integers(0, 256, p).tolist(),
                             rng.integers(0, 256, r).tolist(), "", on_policy=True,
                             advantage=a))
    return out


def _run(be, batches, aggregation):
    stats = be.accumulate_gradients(batches, tau=0.1, aggregation=aggregation)
    return stats, be.gradients()


@pytest.mark.parametrize("arch,tied,chunk,attention,shared,aggregation", [
    ("llama", False, 1024, "sdpa", True, "token-mean"),    # chunked head, GRPO group
    ("llama", False, 1024, "sdpa", False, "token-mean"),   # chunked head, nothing shared
    ("qwen2", True, 0, "sdpa", True, "seq-mean-token-mean"),  # logits through the model
    ("llama", False, 4, "eager", False, "seq-mean-token-sum"),  # several head chunks
])
def test_packed_forward_gives_the_padded_loss_and_gradients(tmp_path, arch, tied, chunk,
                                                            attention, shared, aggregation):
    """One packed row (forced: _pair_cost 0) against the padded forward (no packing, no
    shared-prefix path), float32: the same loss, entropy, token count and every gradient;
    the decoder sees one row of the real tokens only, the shared prompt once."""
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(arch=arch, seed=6,
                                                           tie_word_embeddings=tied))
    seqs = shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]) if shared \
        else _mixed()
    batches = micro_batches(seqs, 8, 256)
    real = sum(len(s.prompt_ids) + len(s.response_ids) for s in seqs) \
        - (len(seqs) - 1) * (12 if shared else 0)
    out = {}
    for packed in (True, False):
        be = load_backend("torch", str(model), logits_chunk=chunk)
        be.model.set_attn_implementation(attention)
        assert be._pack
        be._pack, be._pair_cost, be._share_prefix = packed, 0.0, False
        calls = []
        be.model.get_decoder().register_forward_pre_hook(
            lambda mod, args, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
        out[packed] = _run(be, batches, aggregation)
        if packed:
            assert calls == [(1, real)]
    assert_same_update(out[True], out[False])


def test_packed_forward_under_lora_and_mixed_precision(tmp_path):
    """PEFT passes the packed row's mask and positions through to the base model; with
    mixed_precision the additive mask is in bfloat16, the attention's dtype. LoRA:
    float32, same gradients as the padded forward. Mixed precision: the loss agrees to
    bfloat16's rounding."""
    from gft.lora import LoraConfig
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(seed=4))
    batches = micro_batches(shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]),
                            8, 256)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    for kw, tol in (({"lora": lora}, 1e-5), ({"mixed_precision": True}, 2e-2)):
        out = {}
        for packed in (True, False):
            be = load_backend("torch", str(model), **kw)
            be._pack, be._pair_cost, be._share_prefix = packed, 0.0, False
            out[packed] = _run(be, batches, "token-mean")
        (sp, gp), (s0, g0) = out[True], out[False]
        assert sp["loss"] == pytest.approx(s0["loss"], rel=tol, abs=1e-6)
        if "lora" in kw:
            for name in g0:
                np.testing.assert_allclose(gp[name], g0[name], rtol=1e-4, atol=1e-6,
                                           err_msg=name)


def test_the_packed_update_dispatches_the_operators_of_one_padded_forward(tmp_path):
    """Operator counts are deterministic (no timing): the packed row's update is within a
    few operators of the padded forward's (the gather back to [B, S] and the mask), and
    well under the shared-prefix path's two forwards."""
    model = write_tiny_model(tmp_path / "m", TinyModelSpec(seed=4))
    batches = micro_batches(shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75]),
                            8, 256)
    be = load_backend("torch", str(model))
    counts = {}
    for name, packed, shared in (("packed", True, False), ("padded", False, False),
                                 ("shared", False, True)):
        be._pack, be._pair_cost, be._share_prefix = packed, 0.0, shared
        be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")  # warm
        with OpCounter() as ops:
            be.accumulate_gradients(batches, tau=0.1, aggregation="token-mean")
        counts[name] = ops.counts.total()
    assert counts["packed"] <= counts["padded"] + 10, counts
    assert counts["packed"] < 0.7 * counts["shared"], counts
