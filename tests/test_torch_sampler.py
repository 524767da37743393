"""backends/torch_sampler.py: the fast batched sampler agrees with transformers' generate."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from backends.torch_sampler import (left_pad, pick_tokens, rollout_copy, sample,  # noqa: E402
                                    sync_weights)
from gft.groups import shared_prompts  # noqa: E402
from gft.tiny import BOS_ID, EOS_ID, PAD_ID, TinyModelSpec, write_tiny_model  # noqa: E402

# Prompts of different lengths, so that left padding and per-row positions matter.
PROMPTS = [[BOS_ID, 72, 101, 108, 108, 111], [BOS_ID, 65], [BOS_ID] + list(b"What is 3 plus 5?"),
           [BOS_ID, 120, 121, 122]]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    """A tiny random model with weights scaled up (std 0.02 -> 0.2) so greedy decoding
    wanders over many tokens instead of repeating the last one."""
    path = write_tiny_model(tmp_path_factory.mktemp(request.param),
                            TinyModelSpec(arch=request.param, seed=5))
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(10.0)
    return m


def hf_generate(model, prompts, *, max_new_tokens, eos_id):
    """transformers' greedy generate, cut after the first EOS (the reference)."""
    ids, mask = left_pad(prompts, PAD_ID, torch.device("cpu"))
    cfg = transformers.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=eos_id, pad_token_id=PAD_ID)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def test_greedy_equals_hf_generate_token_for_token(model):
    ref = hf_generate(model, PROMPTS, max_new_tokens=24, eos_id=EOS_ID)
    ours = sample(model, PROMPTS, max_new_tokens=24, greedy=True, eos_id=EOS_ID, pad_id=PAD_ID)
    assert ours == ref
    assert all(len(set(r)) >= 3 for r in ours), "the test model should not just repeat a token"


def test_greedy_with_rows_stopping_at_different_steps_equals_hf(model):
    """Pick as 'EOS' a token that row 0 emits a few steps in: rows finish at different
    steps and leave the batch (their KV rows are dropped), the others must not notice."""
    free = sample(model, PROMPTS, max_new_tokens=24, greedy=True, eos_id=None, pad_id=PAD_ID)
    eos = free[0][4]
    ref = hf_generate(model, PROMPTS, max_new_tokens=24, eos_id=eos)
    ours = sample(model, PROMPTS, max_new_tokens=24, greedy=True, eos_id=eos, pad_id=PAD_ID)
    assert ours == ref
    assert len(ours[0]) <= 5 and ours[0][-1] == eos
    assert any(len(r) == 24 for r in ours), "some row should run to the cap"


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    kw = dict(max_new_tokens=16, temperature=1.0, eos_id=EOS_ID, pad_id=PAD_ID)
    a = sample(model, PROMPTS, seed=11, **kw)
    b = sample(model, PROMPTS, seed=11, **kw)
    c = sample(model, PROMPTS, seed=12, **kw)
    assert a == b
    assert a != c


def test_tiny_top_p_is_greedy(model):
    """top_p -> 0 keeps only the most likely token at every step: exactly argmax."""
    greedy = sample(model, PROMPTS, max_new_tokens=16, greedy=True, eos_id=EOS_ID, pad_id=PAD_ID)
    nucleus = sample(model, PROMPTS, max_new_tokens=16, top_p=1e-6, eos_id=EOS_ID,
                     pad_id=PAD_ID, seed=3)
    assert nucleus == greedy


def test_every_row_ends_at_its_first_eos_or_at_the_cap(model):
    free = sample(model, PROMPTS * 4, max_new_tokens=20, temperature=1.5, eos_id=None,
                  pad_id=PAD_ID, seed=1)
    eos = max(range(256), key=lambda t: sum(t in r for r in free))  # a common token
    rows = sample(model, PROMPTS * 4, max_new_tokens=20, temperature=1.5, eos_id=eos,
                  pad_id=PAD_ID, seed=1)
    assert any(r and r[-1] == eos for r in rows)
    for r in rows:
        assert eos not in r[:-1]
        assert r[-1] == eos or len(r) == 20


def test_empty_inputs():
    assert sample(None, [], max_new_tokens=5, eos_id=EOS_ID, pad_id=PAD_ID) == []


def test_zero_new_tokens(model):
    assert sample(model, PROMPTS, max_new_tokens=0, eos_id=EOS_ID, pad_id=PAD_ID) == [[]] * 4


def test_pick_tokens_top_p_keeps_the_nucleus_and_samples_by_probability():
    # probs 0.5, 0.3, 0.15, 0.05 with top_p 0.7: token 0 (mass above it 0) and token 1
    # (mass above it 0.5 < 0.7) stay; token 2 has 0.8 above it and goes, token 3 too.
    # Renormalised: P(0) = 0.5 / 0.8 = 0.625, P(1) = 0.375.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    toks = pick_tokens(logits, temperature=1.0, top_p=0.7, greedy=False, u=u)
    counts = torch.bincount(toks, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03


def test_pick_tokens_temperature_sharpens():
    # T = 0.5 squares the probabilities: 0.6, 0.4 -> 0.36 / 0.52 ≈ 0.69 for token 0.
    logits = torch.log(torch.tensor([[0.6, 0.4]])).repeat(4000, 1)
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    toks = pick_tokens(logits, temperature=0.5, top_p=1.0, greedy=False, u=u)
    assert abs((toks == 0).float().mean().item() - 0.36 / 0.52) < 0.03


def test_unpadded_batch_with_rows_stopping_equals_hf(model):
    """Equal-length prompts (GRPO's case) take the no-mask path; rows still drop out."""
    prompts = [[BOS_ID, 72, 101, 108], [BOS_ID, 65, 66, 67], [BOS_ID, 10, 20, 30]]
    free = sample(model, prompts, max_new_tokens=20, greedy=True, eos_id=None, pad_id=PAD_ID)
    eos = free[1][3]
    ref = hf_generate(model, prompts, max_new_tokens=20, eos_id=eos)
    assert sample(model, prompts, max_new_tokens=20, greedy=True, eos_id=eos, pad_id=PAD_ID) == ref


def test_empty_prompt_is_refused_and_training_mode_is_restored(model):
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[BOS_ID, 65], []], max_new_tokens=3, eos_id=EOS_ID, pad_id=PAD_ID)
    model.train()
    try:
        sample(model, PROMPTS, max_new_tokens=3, eos_id=EOS_ID, pad_id=PAD_ID)
        assert model.training
    finally:
        model.eval()


def test_frozen_weights_give_the_same_greedy_tokens(model):
    """A model whose weights do not require grad (LoRA's frozen base) takes the prefill
    path that gathers the last column; the tokens must not change."""
    ref = sample(model, PROMPTS, max_new_tokens=12, greedy=True, eos_id=EOS_ID, pad_id=PAD_ID)
    model.requires_grad_(False)
    try:
        got = sample(model, PROMPTS, max_new_tokens=12, greedy=True, eos_id=EOS_ID,
                     pad_id=PAD_ID)
    finally:
        model.requires_grad_(True)
    assert got == ref


def test_rollout_copy_rounds_parameters_only_and_follows_updates(model):
    shadow = rollout_copy(model, torch.bfloat16)
    assert {p.dtype for p in shadow.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the original is untouched
    assert all(b.dtype == ob.dtype for b, ob in zip(shadow.buffers(), model.buffers()))
    rows = sample(shadow, PROMPTS, max_new_tokens=6, eos_id=EOS_ID, pad_id=PAD_ID, seed=0)
    assert len(rows) == len(PROMPTS) and all(rows)
    first = next(model.parameters())
    saved = first.detach().clone()
    with torch.no_grad():
        first.add_(0.5)
    try:
        sync_weights(shadow, model)
        assert torch.equal(next(shadow.parameters()), first.detach().to(torch.bfloat16))
    finally:
        with torch.no_grad():
            first.copy_(saved)


def test_peft_wrapped_model_samples_through_its_adapters(model):
    peft = pytest.importorskip("peft")
    import copy
    base_tokens = sample(model, PROMPTS, max_new_tokens=12, greedy=True, eos_id=EOS_ID,
                         pad_id=PAD_ID)
    cfg = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(copy.deepcopy(model), cfg).eval()
    ref = hf_generate(wrapped, PROMPTS, max_new_tokens=12, eos_id=EOS_ID)
    ours = sample(wrapped, PROMPTS, max_new_tokens=12, greedy=True, eos_id=EOS_ID,
                  pad_id=PAD_ID)
    assert ours == ref
    assert ours != base_tokens, "the adapters should change the output"


def test_several_eos_ids_and_no_pad_id(model):
    free = sample(model, PROMPTS, max_new_tokens=16, greedy=True, eos_id=None, pad_id=PAD_ID)
    stops = [free[0][3], free[2][5]]
    rows = sample(model, PROMPTS, max_new_tokens=16, greedy=True, eos_id=stops, pad_id=None)
    for row, whole in zip(rows, free):
        cut = next((i + 1 for i, t in enumerate(whole) if t in stops), len(whole))
        assert row == whole[:cut]
    assert len(rows[0]) <= 4 and len(rows[2]) <= 6


def test_repeated_prompts_are_prefilled_once_and_decode_like_hf(model):
    """GRPO's G copies of a prompt: one prefill row per distinct prompt, KV rows copied;
    greedy tokens still equal generate's on the full (repeated, padded) batch."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[0]]
    assert shared_prompts(prompts) == ([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [0, 1, 0, 2, 1, 0])
    widths = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: widths.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    try:
        ours = sample(model, prompts, max_new_tokens=12, greedy=True, eos_id=EOS_ID,
                      pad_id=PAD_ID)
    finally:
        hook.remove()
    assert widths[0] == (3, len(PROMPTS[2])), "the prefill should run the 3 distinct prompts"
    assert ours == hf_generate(model, prompts, max_new_tokens=12, eos_id=EOS_ID)


def test_packed_matmuls_sample_the_same_tokens_and_are_undone(model):
    """MKL-packed weights (CPU float32 rollouts): the same tokens as the plain matmuls,
    greedy and sampled, whichever row count the batch has; nn.Linear's own forward is
    back afterwards."""
    from backends.torch_sampler import can_pack, packed_linears
    if not can_pack(model):
        pytest.skip("this torch build has no MKL packed sgemm")
    kw = dict(max_new_tokens=16, eos_id=EOS_ID, pad_id=PAD_ID)
    plain = [sample(model, PROMPTS, greedy=True, **kw), sample(model, PROMPTS, seed=7, **kw)]
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    with packed_linears(model, rows=len(PROMPTS)):
        assert all("forward" in vars(m) for m in linears)
        packed = [sample(model, PROMPTS, greedy=True, **kw), sample(model, PROMPTS, seed=7, **kw)]
        fewer = sample(model, PROMPTS[:3], seed=7, **kw)  # another row count: plain path
    assert packed == plain
    assert fewer == sample(model, PROMPTS[:3], seed=7, **kw)
    assert not any("forward" in vars(m) for m in linears)


def test_graph_decoder_samples_the_same_tokens_from_one_compiled_step(model):
    """The static-cache loop behind rollout_graphs: greedy and sampled tokens equal the
    eager loop's, with padding, rows ending at different steps (they decode on, their
    tokens discarded) and top-p; the whole decode step is one graph (fullgraph), compiled
    once for every call of the same batch shape, again for another row count."""
    from backends.torch_sampler import GraphDecoder
    from tests.helpers import CountingCompiler
    counter = CountingCompiler()
    graphs = GraphDecoder(mode=None, backend=counter)
    free = sample(model, PROMPTS, max_new_tokens=20, greedy=True, eos_id=None, pad_id=PAD_ID)
    eos = free[0][4]
    for kw in (dict(greedy=True, eos_id=eos), dict(seed=11, eos_id=eos),
               dict(seed=3, temperature=0.7, top_p=0.9, eos_id=EOS_ID)):
        eager = sample(model, PROMPTS, max_new_tokens=20, pad_id=PAD_ID, **kw)
        assert sample(model, PROMPTS, max_new_tokens=20, pad_id=PAD_ID, graphs=graphs,
                      **kw) == eager
    assert len(eager := sample(model, PROMPTS, max_new_tokens=20, greedy=True, eos_id=eos,
                               pad_id=PAD_ID)[0]) <= 5 and eager[-1] == eos
    longer = [p + [65, 66] for p in PROMPTS]  # another prompt length, the same cache length
    assert sample(model, longer, max_new_tokens=20, seed=4, eos_id=EOS_ID, pad_id=PAD_ID,
                  graphs=graphs) == sample(model, longer, max_new_tokens=20, seed=4,
                                           eos_id=EOS_ID, pad_id=PAD_ID)
    assert graphs.failure is None and counter.graphs == 1
    three = sample(model, PROMPTS[:3], max_new_tokens=20, seed=5, eos_id=EOS_ID,
                   pad_id=PAD_ID, graphs=graphs)
    assert three == sample(model, PROMPTS[:3], max_new_tokens=20, seed=5, eos_id=EOS_ID,
                           pad_id=PAD_ID)
    assert counter.graphs == 2 and len(graphs.steps) == 2
    assert not model.training


def test_graph_decoder_that_cannot_compile_decodes_eagerly_and_says_why(model):
    from backends.torch_sampler import GraphDecoder

    def broken(gm, example_inputs):
        raise RuntimeError("this compiler cannot take the model")
    graphs = GraphDecoder(mode=None, backend=broken)
    kw = dict(max_new_tokens=12, seed=2, eos_id=EOS_ID, pad_id=PAD_ID)
    with pytest.warns(RuntimeWarning, match="rollout_graphs: decoding eagerly"):
        got = sample(model, PROMPTS, graphs=graphs, **kw)
    assert got == sample(model, PROMPTS, **kw)
    assert not graphs.enabled and "cannot take the model" in graphs.failure
    assert sample(model, PROMPTS, graphs=graphs, **kw) == got  # off for good, no new warning


def test_rollout_graphs_setting_chooses_the_decoder(model):
    from backends.torch_sampler import GraphDecoder, graph_cache_len, graphs_for
    assert [graph_cache_len(n) for n in (1, 256, 257, 600, 1024)] == [256, 256, 512, 1024, 1024]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert graphs_for(model, cpu, "auto") is None
    assert isinstance(graphs_for(model, cuda, "auto"), GraphDecoder)
    assert isinstance(graphs_for(model, cpu, "on"), GraphDecoder)
    assert graphs_for(model, cuda, "off") is None
    assert graphs_for(model, cuda, "on", strategy="fsdp") is None


def test_every_batch_shape_compiles_past_dynamos_recompile_limit(model):
    """Ten row counts: ten compiled steps. Sharing one code object, dynamo would have run
    the ninth and tenth uncompiled, silently (its recompile_limit is 8 per function)."""
    from backends.torch_sampler import GraphDecoder
    from tests.helpers import CountingCompiler
    counter = CountingCompiler()
    graphs = GraphDecoder(mode=None, backend=counter)
    for rows in range(1, 11):
        sample(model, PROMPTS[:1] * rows, max_new_tokens=3, seed=0, eos_id=None,
               pad_id=PAD_ID, graphs=graphs)
    assert counter.graphs == 10 and graphs.failure is None
