"""One SFT-style step, torch against MLX, over the architectures that transformers 5 and
mlx-lm 0.32 both implement: each either trains the same model on both backends (float32
loss and gradients within the parity tests' 1e-5) or is refused on MLX in one line.

Tiny random models (hidden 64, 2 layers, rope_theta 1e5, weights std 0.1), saved by
transformers' own save_pretrained: nothing gft writes is involved, so this is what a user
brings. MLX accepts only the architectures measured equal here
(backends/mlx_config.MLX_VERIFIED); every other one is refused in one line unless
GFT_MLX_UNVERIFIED=1.

- default suite: a few representative architectures in this process, and the refusal of
  every shared architecture outside MLX_VERIFIED (config only, no weights: cheap);
- `-m slow` (CI): every verified architecture, each in its own process;
- `-m sweep` (maintenance, not CI): every shared architecture measured with the
  verification gate lifted — how MLX_VERIFIED is extended. `pytest -s` prints the table.

Each architecture of the slow and sweep parts runs in a child process under a 6 GB
address-space cap and a time limit: some exotic architectures' "tiny" models build
tens of GB (one OOM-killed a whole sweep at 23 GB) or crash mlx-lm outright
(falcon_mamba), and that must be one architecture's outcome, not the end of the run.
"""
from __future__ import annotations

import os
import pkgutil
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mlx_lm")
import mlx_lm.models  # noqa: E402
from mlx_lm.utils import MODEL_REMAPPING  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from backends import load_backend  # noqa: E402
from backends.mlx_config import MLX_VERIFIED, UNVERIFIED_ENV, mlx_model_config  # noqa: E402
from gft.errors import ModelError  # noqa: E402
from gft.tiny import BOS_ID, EOS_ID, PAD_ID, save_tokenizer  # noqa: E402
from tests.test_mlx_backend import make_batch, max_rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-5  # the parity tests' (tests/test_mlx_backend.py)
LOSS = {"tau": 0.002, "aggregation": "token-mean"}
SHAPE = dict(rope_theta=1e5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, vocab_size=259,
             max_position_embeddings=64, head_dim=16, bos_token_id=BOS_ID,
             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
MEMORY_CAP = 6 * 2**30   # address space of one architecture's child process
TIME_CAP = 600           # seconds


def both_implement() -> list[str]:
    """model_type names with a transformers causal LM and an mlx-lm model module."""
    ours = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    return sorted(k for k in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                  if k in ours or MODEL_REMAPPING.get(k) in ours)


# equal on both backends / refused (gemma: mlx-lm computes the exact gelu where
# transformers uses the tanh approximation)
FAST = ["llama", "granite", "gemma"]


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **SHAPE)


def save_tiny(path: Path, model_type: str) -> Path:
    """A tiny random model saved by transformers itself (raises what transformers raises
    when it cannot build one from the generic shape)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() > 1:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


def outcome(model_type: str, path: Path) -> str:
    """One word and a reason: 'equal', 'refused: <the one line>', 'skip: <why>' (transformers
    cannot build or run the tiny model), or 'different: <numbers>'."""
    try:
        save_tiny(path, model_type)
        t = load_backend("torch", str(path))
        s_t = t.accumulate_gradients([make_batch()], **LOSS)
    except Exception as e:  # noqa: BLE001 - transformers' own limits on this shape
        return f"skip: transformers cannot build or run a tiny {model_type}: " \
               f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    try:
        m = load_backend("mlx", str(path))
    except ModelError as e:
        if "\n" in str(e) or str(path) not in str(e):
            return f"different: a refusal that is not one line naming the directory: {e!r}"
        return f"refused: {e}"
    s_m = m.accumulate_gradients([make_batch()], **LOSS)
    if s_m["loss"] != pytest.approx(s_t["loss"], rel=RTOL):
        return f"different: loss {s_m['loss']:.6f} on MLX, {s_t['loss']:.6f} on torch"
    g_t, g_m = t.gradients(), m.gradients()
    if g_t.keys() == g_m.keys():
        err = max_rel_err(g_m, g_t)
        return "equal" if err < RTOL else f"different: gradients, relative error {err:.3g}"
    # transformers 5 renames some architectures' stored weights on load (exaone:
    # transformer.h.N -> model.layers.N) while mlx-lm keeps the stored names: compare
    # the gradients without their names, as sorted (shape, norm) pairs
    norms = lambda g: sorted((v.shape, float(np.linalg.norm(v))) for v in g.values())  # noqa: E731
    a, b = norms(g_t), norms(g_m)
    if [s for s, _ in a] != [s for s, _ in b] or \
            any(abs(x - y) > RTOL * max(y, 1e-12) for (_, x), (_, y) in zip(b, a)):
        return "different: gradients (compared by shape and norm)"
    return "equal (gradients compared by shape and norm: transformers renames the weights)"


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def isolated_outcome(model_type: str, path: Path, *, unverified: bool) -> str:
    """`outcome` in a child process under the memory and time caps; a child that dies is
    'crashed: ...' (a signal, MemoryError, the time cap), the last line it wrote as reason."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(UNVERIFIED_ENV, None)
    if unverified:
        env[UNVERIFIED_ENV] = "1"
    code = ("import sys; from pathlib import Path; from tests.test_archs import outcome; "
            "print('OUTCOME', outcome(sys.argv[1], Path(sys.argv[2])), flush=True)")
    try:
        done = subprocess.run([sys.executable, "-c", code, model_type, str(path)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=TIME_CAP,
                              preexec_fn=_cap_memory)
    except subprocess.TimeoutExpired:
        return f"crashed: over {TIME_CAP} s"
    for line in done.stdout.splitlines():
        if line.startswith("OUTCOME "):
            return line[len("OUTCOME "):]
    last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return f"crashed: exit {done.returncode}: {last}"


@pytest.mark.parametrize("model_type", FAST)
def test_one_step_is_equal_or_refused(tmp_path, model_type):
    result = outcome(model_type, tmp_path / model_type)
    assert result.startswith("refused" if model_type == "gemma" else "equal"), result


def test_every_unverified_shared_architecture_is_refused_on_mlx_in_one_line(tmp_path,
                                                                            monkeypatch):
    """The gate itself, over the config alone (the refusal comes before any weight is
    read): every architecture both libraries implement and MLX_VERIFIED does not name."""
    monkeypatch.delenv(UNVERIFIED_ENV, raising=False)
    unverified = [a for a in both_implement() if a not in MLX_VERIFIED]
    assert len(unverified) > 40  # the sweep left most of mlx-lm's list unverified
    for model_type in unverified:
        path = tmp_path / model_type
        try:
            tiny_config(model_type).save_pretrained(path)
        except Exception:  # noqa: BLE001 - no config of this shape: a model_type alone
            path.mkdir(exist_ok=True)
            (path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
        with pytest.raises(ModelError) as e:
            mlx_model_config(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), model_type


def test_the_gate_names_the_way_around_it_and_lifts(tmp_path, monkeypatch):
    monkeypatch.delenv(UNVERIFIED_ENV, raising=False)
    path = tmp_path / "m"
    tiny_config("glm").save_pretrained(path)
    with pytest.raises(ModelError, match=r"model_type glm has not been measured .*"
                                         r"--backend torch.*GFT_MLX_UNVERIFIED=1"):
        mlx_model_config(path)
    monkeypatch.setenv(UNVERIFIED_ENV, "1")
    assert mlx_model_config(path)["model_type"] == "glm"


def test_every_verified_architecture_is_one_mlx_lm_implements():
    assert MLX_VERIFIED <= set(both_implement())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MLX_VERIFIED - set(FAST)))
def test_every_verified_architecture_trains_the_same_on_both_backends(tmp_path, model_type):
    result = isolated_outcome(model_type, tmp_path / model_type, unverified=False)
    assert result.startswith("equal"), result


@pytest.mark.slow
@pytest.mark.sweep  # maintenance: minutes per exotic architecture; CI runs the part above
@pytest.mark.parametrize("model_type", both_implement())
def test_sweep_every_shared_architecture(tmp_path, model_type):
    """Measures with the gate lifted; an architecture outside MLX_VERIFIED may be anything
    but a silent difference must not be in MLX_VERIFIED."""
    result = isolated_outcome(model_type, tmp_path / model_type, unverified=True)
    print(f"\n{model_type}: {result}")  # pytest -s: the table the README summarises
    if model_type in MLX_VERIFIED:
        assert result.startswith("equal"), result
