"""A user's own model on the torch backend: directories written by transformers' and peft's
own save_pretrained (not by gft), trained through `gft train` and `gft eval`.

What is checked:
- a PEFT adapter directory given as --model (as peft writes it: no tokenizer files) trains
  its adapter over the base its adapter_config.json names: LoRA is put on once, training
  starts from the adapter's weights, and the saved adapter names that base;
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from click.testing import CliRunner  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import gft.run  # noqa: E402
from cli import main  # noqa: E402
from tests.helpers import batch, say_yes_data, scaled_tiny  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
SMALL = ["--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
         "--set", "max_response_tokens=4", "--set", "progress=false"]


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def opened_backends(monkeypatch) -> list:
    """The backends gft.run opens, appended as they are (to look at the in-memory model)."""
    seen: list = []
    original = gft.run.open_backend
    monkeypatch.setattr(gft.run, "open_backend",
                        lambda cfg, path, *a: seen.append(original(cfg, path, *a)) or seen[-1])
    return seen


def peft_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter as peft itself saves it: adapter_config.json naming `base`,
    adapter_model.safetensors, a README, no tokenizer; B nonzero so that it matters."""
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


def test_a_peft_adapter_as_model_trains_over_its_own_base(tmp_path, monkeypatch):
    base = scaled_tiny(tmp_path / "base")
    adapter = peft_adapter(base, tmp_path / "adapter")
    given = load_file(str(adapter / "adapter_model.safetensors"))
    seen = opened_backends(monkeypatch)
    data = say_yes_data(tmp_path / "data")
    cli("train", "--model", adapter, "--data", data, "--preset", "sft", "-o", tmp_path / "run",
        "--max-steps", "1", "--set", "learning_rate=1e-9", *SMALL)
    model = seen[0].model
    # one adapter, the given one: no LoRA layer wrapped inside another
    assert list(model.peft_config) == ["default"]
    assert sorted(seen[0].params) == sorted(given)
    trained = {n: p.detach() for n, p in seen[0].params.items()}
    assert max(float((trained[n] - given[n]).abs().max()) for n in given) < 1e-6
    final = tmp_path / "run" / "final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).resolve() == base.resolve()
    # the saved adapter over that base computes what gft's in-memory model computes
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    probe = batch(2)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(probe.input_ids)).logits
        got = reloaded.eval()(torch.from_numpy(probe.input_ids)).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    # resuming the run loads the same base (config.yaml's model is the adapter)
    cli("train", "--resume", tmp_path / "run", "--set", "max_steps=2")
    saved = json.loads((final / "adapter_config.json").read_text())
    assert Path(saved["base_model_name_or_path"]).resolve() == base.resolve()
