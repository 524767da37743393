"""LoRA on both backends (peft on torch, mlx-lm's LoRA layers on MLX), PEFT-format adapters,
the mlx-lm adapter format through `gft convert`, and `gft fuse`.

What is checked:
- both backends build the same adapters (same names, same init), compute the same loss and
  gradients, and train only the adapters (the optimizer state holds only them);
- a LoRA run through `gft train` on each backend checkpoints the adapter (PEFT format) plus
  trainer and optimizer state; it resumes, also on the other backend;
- the saved adapter loads in peft.PeftModel.from_pretrained and gives gft's in-memory
  log-probs; mlx_lm.load(base, adapter_path=...) on the converted adapter gives them too;
- fused weights equal W + (alpha/r)·B·A (float64 reference).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
from click.testing import CliRunner  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import gft.run  # noqa: E402
from backends import load_backend  # noqa: E402
from cli import main  # noqa: E402
from gft.errors import ModelError  # noqa: E402
from gft.lora import LoraConfig, mlx_config  # noqa: E402
from gft.types import TokenBatch  # noqa: E402
from tests.helpers import batch, say_yes_data, scaled_tiny  # noqa: E402

# peft 0.21 asks transformers 5 a deprecated question on every PeftModel: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
LOSS = {"tau": 0.002, "aggregation": "token-mean"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return scaled_tiny(tmp_path_factory.mktemp("lora") / "base")


def read(path: Path) -> dict[str, np.ndarray]:
    with safe_open(str(path), "np") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def peft_logprobs(base_dir: Path, adapter: Path, b: TokenBatch) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.from_numpy(b.input_ids)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).numpy()


def trained_torch_adapter(base: Path, out: Path, steps: int = 3) -> Path:
    t = load_backend("torch", str(base), lora=LORA)
    for i in range(steps):
        t.train_step([batch(i)], 3e-2, **LOSS)
    t.save_model(out)
    return out


# ------------------------------------------------------------------------- backends

def test_both_backends_train_the_same_adapters_and_only_them(base, tmp_path):
    t = load_backend("torch", str(base), lora=LORA)
    m = load_backend("mlx", str(base), lora=LORA)
    start = t.named_parameters()
    # 2 layers x 3 targets x (A, B), PEFT names; the same init on both backends
    assert len(start) == 12 and all(k.startswith("base_model.model.model.layers.") for k in start)
    assert all(np.array_equal(start[k], m.named_parameters()[k]) for k in start)
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_" not in n}
    for i in range(3):
        r_t, r_m = t.train_step([batch(i)], 3e-2, **LOSS), m.train_step([batch(i)], 3e-2, **LOSS)
        assert r_m["loss"] == pytest.approx(r_t["loss"], rel=1e-5)
        assert r_m["grad_norm"] == pytest.approx(r_t["grad_norm"], rel=1e-5)
    w_t, w_m = t.named_parameters(), m.named_parameters()
    assert all(not np.array_equal(w_t[k], start[k]) for k in w_t)  # every adapter moved
    assert max(np.abs(w_t[k] - w_m[k]).max() for k in w_t) < 1e-5
    for n, p in t.model.named_parameters():  # the base model did not
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n
    for be in (t, m):  # the optimizer holds the adapters only, under the same names
        be.save_optimizer(tmp_path / f"{be.name}.safetensors")
        keys = set(read(tmp_path / f"{be.name}.safetensors"))
        assert keys == {f"{s}.{k}" for k in w_t for s in ("exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_target_that_names_no_linear_layer_is_refused(base, backend):
    """gft puts LoRA on linear layers: 'embed_tokens' beside 'q_proj' was skipped in silence
    on both backends (peft made an embedding adapter the optimizer never saw; MLX wrapped
    linears only) while q_proj trained. Every target must name a linear layer."""
    with pytest.raises(ModelError, match=r"LoRA target\(s\) \['embed_tokens'\] match no "
                       r"linear layer of the model; gft trains LoRA on linear layers \("
                       r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\)"):
        load_backend(backend, str(base), lora=LoraConfig(4, 8.0,
                                                         targets=("q_proj", "embed_tokens")))
    with pytest.raises(ModelError, match=r"\['all-linear'\] match no linear layer"):
        load_backend(backend, str(base), lora=LoraConfig(4, 8.0, targets=("all-linear",)))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_saved_adapter_loads_in_peft_with_the_same_logprobs(base, tmp_path, backend):
    be = load_backend(backend, str(base), lora=LORA)
    for i in range(3):
        be.train_step([batch(i)], 3e-2, **LOSS)
    be.save_model(tmp_path / "adapter")
    names = {p.name for p in (tmp_path / "adapter").iterdir()}  # the adapter, its tokenizer
    assert names == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja"}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 8.0, str(base))
    probe = batch(7)
    ours = be.token_logprobs(probe)
    assert np.abs(peft_logprobs(base, tmp_path / "adapter", probe) - ours).max() < 1e-5
    again = load_backend("mlx" if backend == "torch" else "torch", str(tmp_path / "adapter"))
    assert np.abs(again.token_logprobs(probe) - ours).max() < 1e-5  # the adapter dir loads in gft


# ------------------------------------------------------------------------- runs

def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_lora_run_checkpoints_the_adapter_and_resumes(base, tmp_path, monkeypatch, backend):
    seen = []
    original = gft.run.open_backend
    monkeypatch.setattr(gft.run, "open_backend",
                        lambda cfg, path, *a: seen.append(original(cfg, path, *a)) or seen[-1])
    data = say_yes_data(tmp_path / "data")
    common = ["--model", str(base), "--data", str(data), "--preset", "sft",
              "--set", "lora_rank=4", "--set", "lora_alpha=8", "--set", "lora_targets=[q_proj, v_proj]",
              "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
              "--set", "learning_rate=3e-2", "--set", "rewards=[exact]",
              "--set", "max_response_tokens=4", "--set", "eval_samples=2",
              "--set", "progress=false", "--set", "save_every=2"]
    cli("train", "-o", str(tmp_path / "full"), "--backend", backend, "--max-steps", "4", *common)
    ckpt = tmp_path / "full" / "checkpoints" / "step-000002"
    tokenizer = {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in ckpt.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors",
        "trainer_state.json", "gft.json", *tokenizer}
    final = tmp_path / "full" / "final"  # what users hand on: the adapter and its tokenizer
    assert {p.name for p in final.iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "gft.json", *tokenizer}
    adapter = read(final / "adapter_model.safetensors")
    last = tmp_path / "full" / "checkpoints" / "step-000004"  # where a resume reads AdamW
    assert set(read(last / "optimizer.safetensors")) == {
        f"{s}.{k}" for k in adapter for s in ("exp_avg", "exp_avg_sq")}
    probe = batch(3)
    ours = seen[0].token_logprobs(probe)
    assert np.abs(peft_logprobs(base, tmp_path / "full" / "final", probe) - ours).max() < 1e-5

    # 2 steps, then resumed to 4: on the same backend, and on the other one; the base
    # given as a relative path is stored absolute, alike in every adapter the first run
    # and the resume write, so the adapter loads from any other working directory
    other = "mlx" if backend == "torch" else "torch"
    monkeypatch.chdir(base.parent)
    common[1] = base.name
    for second in (backend, other):
        run = tmp_path / f"part-{second}"
        cli("train", "-o", str(run), "--backend", backend, "--max-steps", "2", *common)
        out = cli("train", "--resume", str(run), "--backend", second, "--set", "max_steps=4")
        assert "from step-000002 (step 2)" in out
        resumed = read(run / "final" / "adapter_model.safetensors")
        tol = 0.0 if second == backend else 2e-5
        assert max(np.abs(resumed[k] - adapter[k]).max() for k in adapter) <= tol, second
        for saved in (run / "final", run / "checkpoints" / "step-000004"):
            cfg = json.loads((saved / "adapter_config.json").read_text())
            assert cfg["base_model_name_or_path"] == str(base.resolve()), saved
        monkeypatch.chdir(tmp_path)
        cli("generate", str(run / "final"), "-p", "hi", "--max-new-tokens", "2",
            "--backend", second)
        monkeypatch.chdir(base.parent)


# ------------------------------------------------------------------------- formats

def mlx_lm_logits(base: Path, adapter: Path, ids: np.ndarray) -> np.ndarray:
    from mlx_lm import load
    model, _ = load(str(base), adapter_path=str(adapter))
    return np.array(model(mx.array(ids.astype(np.int32))))


def test_torch_adapter_to_mlx_lm_format_and_back(base, tmp_path):
    peft_dir = trained_torch_adapter(base, tmp_path / "peft")
    cli("convert", str(peft_dir), str(tmp_path / "mlx"), "--to", "mlx-lm")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                      "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    src, mlx = read(peft_dir / "adapter_model.safetensors"), read(tmp_path / "mlx" / "adapters.safetensors")
    a = "model.layers.1.self_attn.q_proj"
    assert np.array_equal(mlx[a + ".lora_a"], src[f"base_model.model.{a}.lora_A.weight"].T)
    assert np.array_equal(mlx[a + ".lora_b"], src[f"base_model.model.{a}.lora_B.weight"].T)

    ids = batch(5).input_ids
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), peft_dir).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    # two float32 implementations of the same network: rounding only (logits of size ~3)
    assert np.abs(mlx_lm_logits(base, tmp_path / "mlx", ids) - ref).max() < 3e-5

    cli("convert", str(tmp_path / "mlx"), str(tmp_path / "back"))  # mlx-lm -> PEFT
    back = read(tmp_path / "back" / "adapter_model.safetensors")
    assert back.keys() == src.keys() and all(np.array_equal(back[k], src[k]) for k in src)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)


def last_layer_mlx_lm_adapter(base: Path, out: Path, ids: np.ndarray) -> np.ndarray:
    """An adapter as mlx-lm's trainer writes it with num_layers 1 of 2 (mlx-lm's default
    num_layers is 16: a deeper model's adapter covers only its last 16 layers), written to
    `out`; returns mlx-lm's logits for `ids` with it."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    model, _ = load(str(base))
    params = {"rank": 2, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "mlp.up_proj"]}
    linear_to_lora_layers(model, 1, params)
    rng = np.random.default_rng(0)
    weights = {k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
               for k, v in tree_flatten(model.parameters()) if k.endswith(("lora_a", "lora_b"))}
    model.update(tree_unflatten(list(weights.items())))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params, "model": str(base)}))
    return np.array(model(mx.array(ids.astype(np.int32))))


@pytest.mark.mlx
def test_adapter_for_mlx_lm_over_a_base_mlx_lm_misreads_warns(base, tmp_path):
    """A base whose RoPE base is only under rope_parameters (transformers 5's layout;
    mlx_lm.convert copies it as is): gft trains it with transformers' rope_theta, but
    mlx_lm.load(base, adapter_path=...) uses mlx-lm's default 10000, another model
    (logits ~10 apart on a tiny Llama). gft convert --to mlx-lm says so, with the way out;
    a base mlx-lm reads right gets no warning."""
    import shutil
    adapter = trained_torch_adapter(base, tmp_path / "adapter", steps=1)
    quiet = cli("convert", str(adapter), str(tmp_path / "ok"), "--to", "mlx-lm")
    assert "warning" not in quiet
    trap = tmp_path / "trap"
    shutil.copytree(base, trap)
    cfg = json.loads((trap / "config.json").read_text())
    assert cfg.pop("rope_theta") == cfg["rope_parameters"]["rope_theta"] != 10000
    (trap / "config.json").write_text(json.dumps(cfg))
    out = cli("convert", str(adapter), str(tmp_path / "mlx"), "--to", "mlx-lm", "--base", str(trap))
    warning = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "rope_theta" in warning[0] and "gft fuse" in warning[0]
    assert json.loads((trap / "config.json").read_text()) == cfg  # the user's base untouched


def test_mlx_lm_adapter_on_the_last_layers_converts_to_peft(base, tmp_path):
    """An adapter as mlx-lm's trainer writes it (num_layers 1 of 2) loads in peft."""
    out = tmp_path / "mlx"
    ids = batch(6).input_ids
    ref = last_layer_mlx_lm_adapter(base, out, ids)
    assert np.abs(mlx_lm_logits(base, out, ids) - ref).max() < 1e-6  # mlx-lm reads what we wrote
    cli("convert", str(out), str(tmp_path / "peft"), "--to", "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.k_proj"]
    assert cfg["lora_alpha"] == 20.0 and cfg["r"] == 2
    hf = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "peft").eval()
    with torch.no_grad():
        assert np.abs(hf(torch.from_numpy(ids)).logits.numpy() - ref).max() < 1e-5


@pytest.mark.mlx
def test_last_layers_adapter_loads_and_trains_on_mlx(base, tmp_path):
    """The PEFT adapter gft convert makes of it (target_modules as full module paths, as
    PEFT writes for layers_to_transform) loads on gft's MLX backend with mlx-lm's logits,
    only on the last layer, and trains (bug: 'LoRA targets [...] match no linear layer')."""
    ids = batch(6).input_ids
    ref = last_layer_mlx_lm_adapter(base, tmp_path / "mlx", ids)
    cli("convert", str(tmp_path / "mlx"), str(tmp_path / "peft"), "--to", "peft")
    m = load_backend("mlx", str(tmp_path / "peft"))
    assert sorted(m.named_parameters()) == sorted(
        f"base_model.model.model.layers.1.{k}.lora_{w}.weight"
        for k in ("mlp.up_proj", "self_attn.k_proj") for w in "AB")
    assert np.abs(np.array(m.model(mx.array(ids.astype(np.int32)))) - ref).max() < 1e-5
    before = m.named_parameters()
    m.train_step([batch(1)], 1e-2, **LOSS)
    after = m.named_parameters()
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)


@pytest.mark.mlx
def test_a_run_starts_from_an_adapter_and_trains_it_further(base, tmp_path):
    """gft train --model ADAPTER (an mlx-lm adapter made PEFT by gft convert: no tokenizer
    files, no config.json) loads the adapter's base under it and trains that adapter, and
    the run resumes (bug: the adapter directory was taken as its own base model: 'No such
    file or directory: ADAPTER/config.json' or 'cannot load the tokenizer')."""
    ids = batch(6).input_ids
    last_layer_mlx_lm_adapter(base, tmp_path / "mlx", ids)
    cli("convert", str(tmp_path / "mlx"), str(tmp_path / "peft"), "--to", "peft")
    data = say_yes_data(tmp_path / "data")
    run = tmp_path / "run"
    common = ["--backend", "mlx", "--model", str(tmp_path / "peft"), "--data", str(data),
              "--preset", "sft", "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
              "--set", "learning_rate=1e-2", "--set", "max_response_tokens=4",
              "--set", "eval_samples=0", "--set", "progress=false", "--set", "save_every=1"]
    cli("train", "-o", str(run), "--max-steps", "1", *common)
    start, trained = read(tmp_path / "peft" / "adapter_model.safetensors"), read(
        run / "final" / "adapter_model.safetensors")
    assert trained.keys() == start.keys()
    assert any(not np.array_equal(trained[k], start[k]) for k in start if "lora_B" in k)
    cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert "(step 1)" in cli("train", "--resume", str(run), "--set", "max_steps=2")


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_fused_weights_equal_base_plus_scaled_ba(base, tmp_path, framework):
    from gft.convert import fuse
    adapter = trained_torch_adapter(base, tmp_path / "adapter")
    fuse(adapter, tmp_path / "fused", framework=framework)
    w, fused = read(base / "model.safetensors"), read(tmp_path / "fused" / "model.safetensors")
    ad = read(adapter / "adapter_model.safetensors")
    assert fused.keys() == w.keys()
    adapted = 0
    for name in w:
        module = name.removesuffix(".weight")
        a = ad.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            assert np.array_equal(fused[name], w[name]), name  # untouched, bit for bit
            continue
        b = ad[f"base_model.model.{module}.lora_B.weight"]
        expected = w[name].astype(np.float64) + LORA.scale * (b.astype(np.float64) @ a.astype(np.float64))
        assert np.abs(fused[name] - expected).max() < 1e-6, name
        adapted += 1
    assert adapted == 6
    ids = batch(8).input_ids
    model = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    fused_model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits
        assert (fused_model(torch.from_numpy(ids)).logits - ref).abs().max() < 1e-5


@pytest.mark.mlx
@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_fuse_dtype_is_the_precision_of_the_sum(tmp_path, framework):
    """gft fuse --dtype float32 over a bfloat16 base (mlx-community models are bfloat16):
    W + s·B·A is kept in float32, not rounded to the base's bfloat16 first and then
    widened (bug: the fused weights were bfloat16 values in float32 files, the adapter's
    update rounded away to bfloat16's 8 bits)."""
    from gft.convert import fuse
    bf16 = scaled_tiny(tmp_path / "bf16", dtype="bfloat16")
    adapter = trained_torch_adapter(bf16, tmp_path / "adapter", steps=1)
    fuse(adapter, tmp_path / "fused", dtype="float32", framework=framework)
    fused, ad = read(tmp_path / "fused" / "model.safetensors"), read(adapter / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    with safe_open(str(bf16 / "model.safetensors"), "pt") as fh:  # NumPy has no bfloat16
        w = fh.get_tensor(name + ".weight").double().numpy()
    a, b = (ad[f"base_model.model.{name}.lora_{x}.weight"].astype(np.float64) for x in "AB")
    want = w + LORA.scale * (b @ a)
    assert fused[name + ".weight"].dtype == np.float32
    assert np.abs(fused[name + ".weight"] - want).max() < 1e-5


def test_fuse_cli_and_unsupported_adapters(base, tmp_path):
    adapter = trained_torch_adapter(base, tmp_path / "adapter", steps=1)
    out = cli("fuse", str(adapter), "--base", str(base), str(tmp_path / "fused"))
    assert "6 adapted weights" in out and (tmp_path / "fused" / "tokenizer.json").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    result = CliRunner().invoke(main, ["fuse", str(adapter), str(tmp_path / "again")])
    assert result.exit_code == 2 and "use_rslora" in result.output
    with pytest.raises(ModelError, match="last num_layers"):  # layer 0 only, of 2
        mlx_config(LORA, ["model.layers.0.self_attn.q_proj"], 2, None)
    with pytest.raises(ModelError, match="match no linear"):
        load_backend("mlx", str(base), lora=LoraConfig(4, 8.0, targets=("nope",)))


# ------------------------------------------------------------------------- QLoRA (torch)

def bnb_4bit_reason() -> str | None:
    """Why QLoRA cannot run here, or None: bitsandbytes missing, or its 4-bit layer failing
    on this machine's device (CUDA, or CPU from bitsandbytes 0.50)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'gft[qlora]')"
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 8, compute_dtype=torch.float32, quant_type="nf4").to(device)
        layer(torch.ones(1, 64, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means "not supported here"
        return f"bitsandbytes {bnb.__version__} has no 4-bit support on this device: {e}"
    return None


def test_qlora_run_on_torch_over_a_4bit_bitsandbytes_base(base, tmp_path, monkeypatch):
    reason = bnb_4bit_reason()
    if reason:
        pytest.skip(reason)
    seen = []
    original = gft.run.open_backend
    monkeypatch.setattr(gft.run, "open_backend",
                        lambda cfg, path, *a: seen.append(original(cfg, path, *a)) or seen[-1])
    data = say_yes_data(tmp_path / "data")
    cli("train", "-o", str(tmp_path / "run"), "--backend", "torch", "--max-steps", "2",
        "--model", str(base), "--data", str(data), "--preset", "sft",
        "--set", "load_in_4bit=true", "--set", "lora_rank=4", "--set", "lora_alpha=8",
        "--set", "lora_targets=[q_proj, v_proj, down_proj]", "--set", "learning_rate=3e-2",
        "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
        "--set", "rewards=[exact]", "--set", "max_response_tokens=4",
        "--set", "eval_samples=2", "--set", "progress=false")
    import bitsandbytes as bnb
    be = seen[0]
    layer = be.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)  # transformers' BitsAndBytesConfig built it
    trained = be.named_parameters()
    assert len(trained) == 12 and all(np.abs(v).max() > 0 for k, v in trained.items()
                                      if "lora_B" in k)
    final = tmp_path / "run" / "final"
    record = json.loads((final / "base_quantization.json").read_text())
    assert record["quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert record["description"] == "bitsandbytes 4-bit nf4"
    # the adapter loads in peft over the float base: log-probs move by the NF4 rounding only
    probe = batch(3)
    moved = np.abs(peft_logprobs(base, final, probe) - be.token_logprobs(probe)).max()
    assert 0 < moved < 3.0


def test_a_checkpoint_saved_in_4bit_trains_lora_only_on_torch(base, tmp_path):
    """A model saved by transformers after BitsAndBytesConfig (as Unsloth's *-bnb-4bit
    checkpoints are): a full fine-tune trained the norms alone through 4-bit kernels
    without a backward, then failed to save (a NotImplementedError traceback, the run
    lost); mlx-lm failed on 42 unknown parameters. Both are now one line before loading;
    LoRA over it (QLoRA) trains on torch; fuse asks for the full-precision base."""
    reason = bnb_4bit_reason()
    if reason:
        pytest.skip(reason)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    saved = tmp_path / "bnb-4bit"
    AutoModelForCausalLM.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                     bnb_4bit_quant_type="nf4"),
        device_map={"": "cpu"}).save_pretrained(saved)
    AutoTokenizer.from_pretrained(base).save_pretrained(saved)
    data = say_yes_data(tmp_path / "data")
    common = ["--model", str(saved), "--data", str(data), "--max-steps", "1", "--preset", "sft",
              "--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
              "--set", "progress=false", "--set", "eval_samples=0"]
    for backend, lora, says in (("torch", [], "set lora_rank"),
                                ("mlx", ["--set", "lora_rank=4"], "mlx-lm cannot read")):
        result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / backend),
                                           "--backend", backend, *common, *lora])
        assert result.exit_code == 2, result.output
        assert "bitsandbytes 4-bit nf4" in result.output and says in result.output
        assert "Traceback" not in result.output
        assert not (tmp_path / backend / "checkpoints").exists()
    cli("train", "-o", str(tmp_path / "qlora"), "--backend", "torch", *common,
        "--set", "lora_rank=4", "--set", "lora_targets=[q_proj, v_proj]")
    final = tmp_path / "qlora" / "final"
    assert json.loads((final / "base_quantization.json").read_text())["description"] == \
        "bitsandbytes 4-bit nf4"
    result = CliRunner().invoke(main, ["fuse", str(final), str(tmp_path / "fused")])
    assert result.exit_code == 2 and "--base DIR" in result.output, result.output
    out = cli("fuse", str(final), str(tmp_path / "fused"), "--base", str(base))
    assert "4 adapted weights fused" in out  # q_proj, v_proj in 2 layers
    assert "bitsandbytes 4-bit nf4; fused into" in out
    # the 4-bit checkpoint in floating point: transformers' dequantize(), loadable by
    # mlx-lm, and NF4's rounding away from the model it was made from (said in a note)
    out = cli("convert", str(saved), str(tmp_path / "float"), "--dequantize")
    assert "de-quantized from bitsandbytes 4-bit nf4" in out and "note:" in out
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization_config" not in config and "rope_theta" in config
    ids = torch.from_numpy(batch(2).input_ids)
    with torch.no_grad():
        got, want = (AutoModelForCausalLM.from_pretrained(d)(ids).logits
                     for d in (tmp_path / "float", base))
    assert 0 < float((got - want).abs().max()) < 3.0  # as QLoRA's NF4 test above
    np.testing.assert_allclose(
        load_backend("mlx", str(tmp_path / "float")).token_logprobs(batch(2)),
        load_backend("torch", str(tmp_path / "float")).token_logprobs(batch(2)), atol=1e-4)


def test_load_in_4bit_needs_lora_and_torch(base, tmp_path):
    data = say_yes_data(tmp_path / "data")
    common = ["--model", str(base), "--data", str(data), "--max-steps", "1",
              "--set", "load_in_4bit=true"]
    result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "a"), "--backend", "torch",
                                       *common])
    assert result.exit_code == 2 and "set lora_rank" in result.output
    result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "b"), "--backend", "mlx",
                                       "--set", "lora_rank=4", *common])
    assert result.exit_code == 2 and "--quantize 4" in result.output
