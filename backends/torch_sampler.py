"""Batched KV-cache sampling for transformers causal LMs, without `generate`'s per-step machinery.

    prompts (B rows, any lengths) -> left-pad the distinct ones -> ONE prefill forward
    (explicit position_ids, padding mask, logits of the last column only; rows repeating a
    prompt get copies of its KV rows) -> decode loop: one model call per token
    on the rows still running, sampled with plain torch ops.

What it does differently from `model.generate` (and why it is faster on CPU):
- no logits-processor / stopping-criteria objects, no `prepare_inputs_for_generation`,
  no per-step cache_position bookkeeping: the loop body is the model call, a sample, and
  two small tensor updates;
- finished rows leave the batch (their KV rows are dropped), so a step costs what the
  rows still running cost, and the loop ends when the last row has emitted EOS;
- the KV cache is preallocated for prompt + max_new_tokens and written in place
  (`GrowingCache`), instead of `DynamicCache`'s torch.cat of the whole cache every step;
- when no row is padded (GRPO's usual case: one prompt repeated G times) no attention
  mask is passed at all, so attention takes the causal fast path.

On CUDA (`rollout_graphs`, GraphDecoder): the same loop over a static KV cache with the
decode step compiled and replayed as a CUDA graph, all rows decoding to the end.

Sampling: temperature, then nucleus (top-p) by sort + cumsum, then one inverse-CDF draw
per row and position from a table of uniforms made from that row's own seed
(gft.distributed.uniform_table): a row samples the same tokens whichever rows share its
batch, chunk or rank, which is what lets N data-parallel ranks sample what one process does.
greedy=True is argmax, token for token what `generate(do_sample=False)` returns.

Shapes: B rows, P padded prompt length, V vocabulary.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache

from gft.distributed import row_seeds, uniform_table
from gft.groups import shared_prompts

try:  # transformers >= 4.56 builds caches from layer objects
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older: keep its DynamicCache as it is
    DynamicLayer = None


class GrowingLayer(DynamicLayer or object):
    """A DynamicLayer whose keys/values live in a buffer preallocated to `capacity`
    positions; `update` writes the new positions in place and returns views.

    DynamicLayer re-concatenates the whole cache at every token (O(L²) copying); this one
    copies only the new token. Rows are dropped with `batch_select_indices` as usual.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.k_buf = self.v_buf = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.k_buf is None:
            b, h, _, d = key_states.shape
            kw = dict(dtype=key_states.dtype, device=key_states.device)
            self.k_buf = torch.empty(b, h, self.capacity, d, **kw)
            self.v_buf = torch.empty(b, h, self.capacity, value_states.shape[-1], **kw)
            self.is_initialized, self.device = True, key_states.device
        n = key_states.shape[-2]
        end = self.length + n
        self.k_buf[:, :, self.length:end] = key_states
        self.v_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.k_buf is not None:
            self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
            self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]


def full_attention_only(model) -> bool:
    """Every layer attends to the whole past (no sliding windows), and this transformers
    builds caches from layer objects (>= 4.56)."""
    config = model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    return DynamicLayer is not None and (
        layer_types is None or all(t == "full_attention" for t in layer_types))


def growing_cache(model, capacity: int) -> DynamicCache:
    """A DynamicCache of GrowingLayers (full attention only), else a plain DynamicCache."""
    config = model.config.get_text_config(decoder=True)
    if DynamicLayer is None:
        return DynamicCache()
    if not full_attention_only(model):
        return DynamicCache(config=model.config)  # sliding windows: keep transformers' layers
    cache = DynamicCache()
    cache.layers = [GrowingLayer(capacity) for _ in range(config.num_hidden_layers)]
    cache.layer_class_to_replicate = None
    return cache


def cache_keyword(model) -> str:
    """transformers >= 5.x names the KV-cache argument `cache` (`past_key_values` still
    works there through a deprecation wrapper, at a cost per call); older versions only
    know `past_key_values`."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_logits_only(model, width: int) -> dict:
    """Prefill keyword asking for the last column's logits only ([B, 1, V], not [B, P, V]).

    An index tensor rather than `logits_to_keep=1`: the int form hands lm_head a strided
    [B, 1, H] slice, which torch.matmul cannot fold into one matrix product when the
    weight does not require grad (a frozen base under LoRA, a rollout copy) and then runs
    as a batched product over B copies of the lm_head weight (1.5 s for SmolLM2, B = 8).
    Indexing with a tensor gathers a contiguous [B, 1, H] instead."""
    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters:
        return {}
    device = next(model.parameters()).device
    return {"logits_to_keep": torch.tensor([width - 1], device=device)}


def pick_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, greedy: bool,
                u: torch.Tensor) -> torch.Tensor:
    """One token per row from [B, V] logits: argmax, or a temperature / top-p draw.

    A draw is inverse-CDF: one uniform number per row (u, [B] float64) against the cumulative
    probabilities (float64, so 150k-token vocabularies lose no mass to rounding),
    instead of torch.multinomial's V random numbers per row — on CPU the random
    numbers, not the arithmetic, are what a multinomial over a 50k vocabulary costs.
    """
    if greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    order = None
    if top_p < 1.0:
        logits, order = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass
        # (the top token is always kept).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)
    else:
        probs = logits.softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)                                   # [B, V]
    u = u.to(cdf.dtype)[:, None]
    # right=True: the first index whose CDF exceeds u·total, never a zero-probability one.
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(cdf.shape[1] - 1)
    idx = idx.squeeze(-1)
    return idx if order is None else order.gather(-1, idx[:, None]).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and 0/1 mask with every row's last prompt token in the last column."""
    width = max(1, max(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def sample(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           eos_id: int | Sequence[int] | None, pad_id: int | None,
           seed: int | Sequence[int] = 0,
           device: torch.device | str | None = None,
           graphs: "GraphDecoder | None" = None) -> list[list[int]]:
    """Completions for `prompts` (token ids), each cut after its first EOS (kept).

    seed: one per row, or one for the call (row i then uses row_seed(seed, i)).
    eos_id: one id, several (any of them ends a row), or None (every row runs to
    max_new_tokens). pad_id only fills the left padding (None: 0); it never reaches the
    output. Every prompt needs at least one token (a BOS will do). Runs the model in eval
    mode, restoring its mode afterwards.
    graphs: decode through this GraphDecoder's compiled step (CUDA graphs on a GPU); the
    same tokens as without it, up to the rounding of a different kernel. If the compiler
    cannot take the model, the decoder turns itself off (saying why) and this call and
    every later one decodes eagerly."""
    B = len(prompts)
    if B == 0 or max_new_tokens <= 0:
        return [[] for _ in range(B)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    # A PEFT wrapper forwards **kwargs to the transformers model whose modules it has
    # patched in place: call that model directly, so its signature (cache keyword,
    # logits_to_keep) is visible; the adapters still run.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              greedy=greedy, eos_id=eos_id, pad_id=pad_id, seed=seed, device=device)
    try:
        with torch.inference_mode():
            if graphs is not None and graphs.enabled:
                try:
                    return _sample_static(inner, prompts, graphs=graphs, **kw)
                except Exception as e:  # noqa: BLE001 - any compiler failure: decode eagerly
                    graphs.disable(e)
            return _sample(inner, prompts, **kw)
    finally:
        model.train(was_training)


def _loop_inputs(model, rows: int, seed, max_new_tokens: int, eos_id, pad_id, device):
    """What both decode loops start from: the device, each row's uniforms [rows, T], the
    padding id and the stop ids (a tensor, or None)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    draws = torch.from_numpy(uniform_table(row_seeds(seed, rows), max_new_tokens)).to(device)
    stop = None if eos_id is None else torch.tensor(
        [eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    return device, draws, 0 if pad_id is None else pad_id, stop


def _sample(model, prompts, *, max_new_tokens, temperature, top_p, greedy, eos_id, pad_id,
            seed, device) -> list[list[int]]:
    B = len(prompts)
    device, draws, pad_id, stop = _loop_inputs(model, B, seed, max_new_tokens, eos_id, pad_id,
                                               device)
    distinct, copies = shared_prompts(prompts)
    ids, mask = left_pad(distinct, pad_id, device)
    padded = bool((mask == 0).any())
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = growing_cache(model, ids.shape[1] + max_new_tokens)
    kv = {cache_keyword(model): cache, "use_cache": True}
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions,
                **last_logits_only(model, ids.shape[1]), **kv)
    logits = out.logits[:, -1]
    if len(distinct) < B:  # one prefill per distinct prompt, its KV rows copied per row
        copies = torch.tensor(copies, device=device)
        cache.batch_select_indices(copies)
        logits, mask, positions = logits[copies], mask[copies], positions[copies]
    next_pos = positions[:, -1:] + 1                     # [b, 1] position of the next token
    rows = torch.arange(B, device=device)                 # original index of each live row
    result = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        tok = pick_tokens(logits, temperature=temperature, top_p=top_p, greedy=greedy,
                          u=draws[rows, t])
        result[rows, t] = tok
        if t == max_new_tokens - 1:
            break
        if stop is not None:
            done = torch.isin(tok, stop)
            if bool(done.any()):
                lengths[rows[done]] = t + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                rows, tok, next_pos = rows[keep], tok[keep], next_pos[keep]
                if padded:
                    mask = mask[keep]
        if padded:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask if padded else None,
                    position_ids=next_pos, **kv)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return [row[:n] for row, n in zip(result.tolist(), lengths.tolist())]


def _sample_static(model, prompts, *, graphs, max_new_tokens, temperature, top_p, greedy,
                   eos_id, pad_id, seed, device) -> list[list[int]]:
    """`_sample` over a static cache with a compiled decode step (GraphDecoder).

    The shapes never change inside the loop, so one compiled step (one CUDA graph) serves
    every token: all B rows decode until the last one ends (a row that has emitted EOS goes
    on, its tokens discarded; a smaller batch would be another graph), attention reads the
    whole cache with a [B, cache length] padding mask, and the prompt is run for every
    row rather than once per distinct prompt (a static cache has one slot per row)."""
    B = len(prompts)
    device, draws, pad_id, stop = _loop_inputs(model, B, seed, max_new_tokens, eos_id, pad_id,
                                               device)
    ids, prompt_mask = left_pad(prompts, pad_id, device)
    P = ids.shape[1]
    cache, length, step = graphs.step(model, B, P + max_new_tokens)
    cache.reset()
    # 1 on every prompt token and every position to come; causality hides the future ones
    mask = torch.ones(B, length, dtype=torch.long, device=device)
    mask[:, :P] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_keyword(model): cache}, **last_logits_only(model, P))
    logits = out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    result = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    running = torch.ones(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        tok = pick_tokens(logits, temperature=temperature, top_p=top_p, greedy=greedy,
                          u=draws[:, t])
        result[:, t] = tok
        if t == max_new_tokens - 1:
            break
        if stop is not None:
            ended = running & torch.isin(tok, stop)
            lengths[ended] = t + 1
            running &= ~ended
            if not bool(running.any()):
                break
        logits = step(tok[:, None], next_pos, mask)
        next_pos = next_pos + 1
    return [row[:n] for row, n in zip(result.tolist(), lengths.tolist())]


def graph_cache_len(n: int) -> int:
    """Static caches come in powers of two from 256: each length is one more compile and
    one more captured graph, so prompts of nearby lengths share one."""
    return max(256, 1 << (n - 1).bit_length())


class GraphDecoder:
    """The decode step compiled once per (rows, cache length) over a StaticCache of its
    own, and replayed: on a GPU, `mode="reduce-overhead"` records it as a CUDA graph.

    Why: a small model's decode step on a GPU is kernel launches, not arithmetic. On an
    H200 (benchmarks/RESULTS.md), SmolLM2-135M's eager step took 18–35 ms for 8 rows, of which
    the matrix products' kernels were 3–5 ms and reading the weights 0.07 ms; a graph
    replays a step's hundreds of kernels with one launch.

    Each (rows, cache length) keeps its cache and its graph for the engine's lifetime
    (rollout batches and graph_cache_len's powers of two keep them few); the weights are
    read where they live, so optimizer updates in place need no re-capture. The first use
    of a shape compiles (tens of seconds on a GPU). Any failure to compile or run turns
    the decoder off for good, with a warning that says why (`failure`)."""

    def __init__(self, *, mode: str | None = "reduce-overhead", backend: str = "inductor"):
        self.mode, self.backend = mode, backend
        self.steps: dict[tuple, tuple] = {}
        self.failure: str | None = None

    @property
    def enabled(self) -> bool:
        return self.failure is None

    def disable(self, error: BaseException) -> None:
        import warnings
        root = error  # torch.compile wraps the compiler's own error: name that one too
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        self.failure = _first_line(error) if root is error else \
            f"{type(error).__name__} ({_first_line(root)})"
        warnings.warn(f"rollout_graphs: decoding eagerly from now on ({self.failure})",
                      RuntimeWarning, stacklevel=3)

    def step(self, model, rows: int, length: int):
        """(cache, cache length, step): step(tokens [B, 1], positions [B, 1],
        mask [B, cache length]) -> next-token logits [B, V], writing the cache in place."""
        from transformers.cache_utils import StaticCache
        key = (id(model), rows, graph_cache_len(length))
        if key not in self.steps:
            cache = StaticCache(config=model.config, max_cache_len=key[2])
            kw = cache_keyword(model)

            def decode(tok, position_ids, attention_mask):
                out = model(input_ids=tok, position_ids=position_ids,
                            attention_mask=attention_mask, use_cache=True, **{kw: cache})
                return out.logits[:, -1].float()

            # a code object of its own per shape: dynamo keeps its compiled versions on
            # the code object and stops compiling one after 8 (recompile_limit), silently
            # running it uncompiled; a run's shapes and engines must not share that budget
            decode = types.FunctionType(decode.__code__.replace(), decode.__globals__,
                                        decode.__name__, None, decode.__closure__)
            compiled = torch.compile(decode, fullgraph=True, dynamic=False,
                                     backend=self.backend,
                                     **({"mode": self.mode} if self.mode else {}))

            def step(tok, position_ids, attention_mask):
                # a graph's outputs are overwritten by its next replay: the caller has
                # used the last logits (sampled from them) before asking for new ones
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(tok, position_ids, attention_mask)
            self.steps[key] = (cache, key[2], step)
        return self.steps[key]


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def graphs_for(model, device: torch.device, setting: str,
               strategy: str | None = None) -> GraphDecoder | None:
    """The rollout_graphs setting as a decoder or None. auto: on CUDA. Never under FSDP2
    (its weights are gathered anew for each rollout) or with sliding-window attention."""
    if setting == "off" or strategy == "fsdp" or not full_attention_only(model):
        return None
    if setting == "auto" and device.type != "cuda":
        return None
    return GraphDecoder()


# --------------------------------------------------------------------------- packed CPU matmuls

MIN_TOKENS_TO_PACK = 16
"""Packing a weight costs about what a few decode steps save: shorter rollouts keep the
plain matmuls."""


def can_pack(model) -> bool:
    """MKL's packed sgemm is there (x86 torch builds), the weights are float32 on the CPU
    and no autocast would expect its own casting."""
    mkl = getattr(torch.ops, "mkl", None)
    if not (torch.backends.mkl.is_available() and hasattr(mkl, "_mkl_reorder_linear_weight")):
        return False
    p = next(model.parameters(), None)
    return (p is not None and p.device.type == "cpu" and p.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


PACK_MIN_BYTES = 32 << 20
"""Only weights this large are packed (for SmolLM2, the 49152 x 576 lm_head). Packing
every weight as well was measured twice (benchmarks/README.md): 0.7-1.0 GiB more peak RSS
(a packed copy of the model, which fragments the heap the update then reuses) for a
rollout that was 0.2 s faster in a long-running process and slower in a fresh one."""


@contextlib.contextmanager
def packed_linears(model, rows: int, min_bytes: int = 0):
    """Inside, every float32 CPU nn.Linear of `model` whose weight has at least
    `min_bytes` computes through an MKL-packed copy of it, made for `rows`-row products.

    Why: a decode step multiplies `rows` (~8) activations by every weight, and MKL's plain
    sgemm at so few rows reaches about half the memory bandwidth (SmolLM2-135M, 2 cores:
    ~10 GB/s for the 49152 x 576 lm_head against a 25 GB/s copy); reordered once into MKL's
    packed layout (torch.ops.mkl, what torch.compile's CPU freezing uses) it runs ~1.8x
    faster. The results are the plain sgemm's, bit for bit here. Inputs of any other row
    count (the prefill, a batch after rows finished) fall back to the plain product
    inside the op. The copies live only inside the `with`: an optimizer update between
    two rollouts cannot leave them stale."""
    mods = [m for m in model.modules() if type(m) is torch.nn.Linear
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and m.weight.numel() * 4 >= min_bytes]
    for mod in mods:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(mod.weight.detach(), rows)
        mod.forward = functools.partial(_packed_forward, mod, packed, rows)
    try:
        yield
    finally:
        for mod in mods:
            del mod.forward  # back to nn.Linear.forward; the packed copy is freed


def rollout_packing(model, rows: int, max_new_tokens: int, strategy: str | None = None):
    """What a rollout engine wraps its decoding in: MKL-packed copies of the large weights
    (packed_linears) for CPU float32 rollouts long enough to repay the packing (not under
    FSDP2, whose weights are gathered per layer); otherwise nothing."""
    if strategy == "fsdp" or max_new_tokens < MIN_TOKENS_TO_PACK or not can_pack(model):
        return contextlib.nullcontext()
    return packed_linears(model, rows, min_bytes=PACK_MIN_BYTES)


def _packed_forward(mod: torch.nn.Linear, packed: torch.Tensor, rows: int,
                    x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkl._mkl_linear(flat, packed, mod.weight, mod.bias, rows)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# --------------------------------------------------------------------------- low-precision rollouts

def rollout_copy(model, dtype: torch.dtype = torch.bfloat16):
    """A frozen copy of `model` whose parameters are in `dtype`, to sample rollouts from.

    On CPUs with AMX / AVX512-BF16 the decode step's skinny matmuls run about twice as fast
    in bfloat16 as in float32 (SmolLM2-135M, 8 rows: half the CPU time). The update keeps
    the model's own dtype; rollouts then come from the same policy rounded to bfloat16, as
    in trainers that sample with vLLM. Buffers are left alone: RoPE's inverse frequencies
    rounded to bfloat16 would shift every position's angle.
    Call `sync_weights(copy, model)` after every optimizer update."""
    shadow = copy.deepcopy(model).eval().requires_grad_(False)
    for p in shadow.parameters():
        p.data = p.data.to(dtype)
    return shadow


@torch.no_grad()
def sync_weights(shadow, model) -> None:
    """Copy (and round) the model's current parameters into its rollout copy."""
    for dst, src in zip(shadow.parameters(), model.parameters()):
        dst.copy_(src)


# --------------------------------------------------------------------------- rollout engines

class PolicyEngine:
    """Rollouts from the training weights themselves (the default: exactly on-policy).
    Under FSDP2 every layer is gathered for the duration of a rollout (torch_parallel)."""

    def __init__(self, model, tokenizer, device, strategy: str | None = None,
                 graphs: str = "off"):
        """graphs: the rollout_graphs setting (auto | on | off; see graphs_for)."""
        self.model, self.tokenizer, self.device, self.strategy = model, tokenizer, device, strategy
        self.graphs = graphs_for(self._model(), torch.device(device), graphs, strategy)

    def generate(self, prompts, sampling, seeds: list[int]) -> list[list[int]]:
        from backends.torch_parallel import full_weights
        tok, out = self.tokenizer, []
        model = self._model()
        packing = rollout_packing(model, min(sampling.batch_size, len(prompts)),
                                  sampling.max_new_tokens, self.strategy)
        with full_weights(self.model, self.strategy), packing:
            for start in range(0, len(prompts), sampling.batch_size):
                end = start + sampling.batch_size
                out.extend(sample(model, list(prompts[start:end]),
                                  max_new_tokens=sampling.max_new_tokens,
                                  temperature=sampling.temperature, top_p=sampling.top_p,
                                  greedy=sampling.greedy,
                                  eos_id=sampling.stop_ids or tok.eos_token_id,
                                  pad_id=tok.pad_token_id, seed=seeds[start:end],
                                  device=self.device, graphs=self.graphs))
        return out

    def _model(self):
        return self.model

    def sync(self) -> None:
        """Nothing to copy: the engine samples from the weights being trained."""


class Bfloat16Engine(PolicyEngine):
    """Rollouts from a bfloat16 copy of the policy (`rollout_copy`), refreshed from the
    training weights before the first rollout after each update. The decode loop's skinny
    matmuls run ~1.4x faster in bfloat16 on CPUs with AVX512-BF16/AMX (benchmarks/RESULTS.md)
    and on GPUs; rollouts are then the policy rounded to bfloat16, slightly off-policy, as
    with a vLLM engine. The update keeps the model's own dtype."""

    def __init__(self, model, tokenizer, device, strategy: str | None = None,
                 graphs: str = "off"):
        self.shadow = rollout_copy(model)
        super().__init__(model, tokenizer, device, None, graphs)

    def _model(self):
        return self.shadow

    def sync(self) -> None:
        sync_weights(self.shadow, self.model)


ROLLOUT_ENGINES = {"policy": PolicyEngine, "bfloat16": Bfloat16Engine}
