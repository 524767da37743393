"""A user's own model on the torch backend: directories written by transformers' and peft's
own save_pretrained (not by gft), trained through `gft train` and `gft eval`.

What is checked:
- a PEFT adapter directory given as --model (as peft writes it: no tokenizer files) trains
  its adapter over the base its adapter_config.json names: LoRA is put on once, training
  starts from the adapter's weights, and the saved adapter names that base;
- a model with learned absolute positions (GPT-2, OPT) refuses, in one line before any
  work, a run or an evaluation whose sequences would index past its position table (an
  IndexError deep in torch, otherwise), and runs right up to it;
- a model stored in another dtype than the run trains in says so in one line (a
  bfloat16 model at the default dtype comes back float32), and dtype: bfloat16 keeps it
  bfloat16, the saved weights exactly gft's in-memory ones;
- a tokenizer without a pad token comes back without one (gft pads with EOS in memory
  only), for a full model and a LoRA adapter;
- a tokenizer with tokens added after the model was saved (chat markers, embeddings not
  resized): data that uses them is refused in one line naming the row; data that does
  not trains;
- LoRA over GPT-2's Conv1D layers (weights stored [in, out]): the adapter records
  fan_in_fan_out as peft does, `gft fuse` adds (B·A)^T (the fused model computes what the
  adapter does, a square c_proj included), the run resumes, and `gft convert --to mlx-lm`
  refuses it in one line;
- Mistral with a sliding window shorter than the rows (no layer_types in its config):
  the update's loss and gradients are transformers' own forward's (the packed row, whose
  mask knows no window, is used only for micro-batches within the window);
- a tokenizer that ends every text with EOS (add_eos_token, a post-processor) does not end
  the prompts with it: the response would follow an EOS;
- a model saved with dropout (GPT-2, OPT, Llama's attention_dropout, GPT-NeoX, Phi-3,
  Falcon, which reads the rates from its config):
  the update scores tokens under the network that sampled them (dropout off, as in
  eval mode, as on mlx), unless disable_dropout: false; LoRA's own dropout and the saved
  config's rates are kept;
- several architectures as transformers saves them (tied and untied, with a
  generation_config.json of several EOS ids): after an update the saved model reloads in
  transformers with gft's in-memory logits, its ties, dtype and generation config.
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import gft.run  # noqa: E402
from backends.torch_backend import learned_position_limit  # noqa: E402
from cli import main  # noqa: E402
from gft.tiny import BOS_ID, EOS_ID, PAD_ID, save_tokenizer  # noqa: E402
from backends import load_backend  # noqa: E402
from gft.groups import micro_batches  # noqa: E402
from tests.helpers import batch, say_yes_data, scaled_tiny, shared_prompt_group  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")
SMALL = ["--set", "prompts_per_step=4", "--set", "prompts_per_minibatch=4",
         "--set", "max_response_tokens=4", "--set", "progress=false"]


def cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result.output


def saved_by_transformers(path: Path, model_type: str, dtype=torch.float32, **shape) -> Path:
    """A tiny random model of `model_type` written by transformers' own save_pretrained,
    with the byte tokenizer (specials 256-258)."""
    config = AutoConfig.for_model(model_type, vocab_size=259, bos_token_id=BOS_ID,
                                  eos_token_id=EOS_ID, pad_token_id=PAD_ID, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(path)
    save_tokenizer(path)
    return path


GPT2 = dict(n_embd=32, n_layer=1, n_head=2, n_positions=64)


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


def test_learned_positions_are_found_where_the_model_has_a_table_of_them(tmp_path):
    shapes = {"gpt2": GPT2,  # wpe: 64 rows
              "opt": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
              "llama": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)}  # RoPE
    found = {kind: learned_position_limit(AutoModelForCausalLM.from_pretrained(
        saved_by_transformers(tmp_path / kind, kind, **shape))) for kind, shape in shapes.items()}
    assert found == {"gpt2": 64, "opt": 64, "llama": None}  # OPT's table has 66 rows


def test_sequences_past_gpt2s_positions_are_refused_before_any_work(tmp_path):
    model = saved_by_transformers(tmp_path / "gpt2", "gpt2", **GPT2)
    data = say_yes_data(tmp_path / "data")  # the longest prompt, 'Q10: say yes\nA:': 15 tokens
    common = ["--model", model, "--data", data, "--max-steps", "1", "--set", "rewards=[exact]",
              "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
              "--set", "progress=false", "--set", "eval_samples=0"]
    out = cli("train", "-o", tmp_path / "long", "--preset", "grpo", *common,
              "--set", "max_response_tokens=60", code=2)
    assert out.strip().splitlines()[-1:] == [
        "error: the model has learned positions for 64 tokens (config.json "
        "max_position_embeddings or n_positions), but the longest prompt (15 tokens) plus "
        "max_response_tokens (60 tokens) reaches 75, past 64; lower max_response_tokens "
        "to at most 49"]
    assert not (tmp_path / "long" / "checkpoints").exists()
    # right up to the wall (most rollouts of a random model run to max_response_tokens)
    cli("train", "-o", tmp_path / "fits", "--preset", "grpo", *common,
        "--set", "max_response_tokens=49")
    # without sampling only the dataset's responses count (' yes' + EOS: 5 tokens)
    cli("train", "-o", tmp_path / "sft", "--preset", "sft", *common,
        "--set", "max_response_tokens=2048")
    # ...each with its own prompt: a long prompt with a short answer and a short prompt
    # with a long answer fit (49 + 5 and 10 + 41 of 64), though the longest prompt plus
    # the longest answer would not
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "x" * 49, "completion": " yes"}) + "\n"
                     + json.dumps({"prompt": "short", "completion": "y" * 40}) + "\n")
    cli("train", "-o", tmp_path / "mixed", "--preset", "sft", "--model", model, "--data", mixed,
        "--max-steps", "1", "--set", "prompts_per_step=2", "--set", "prompts_per_minibatch=2",
        "--set", "progress=false", "--set", "max_response_tokens=2048")
    mixed.write_text(json.dumps({"prompt": "short", "completion": "y" * 60}) + "\n")
    out = cli("train", "-o", tmp_path / "over", "--preset", "sft", "--model", model,
              "--data", mixed, "--max-steps", "1", "--set", "prompts_per_step=1",
              "--set", "prompts_per_minibatch=1", "--set", "progress=false",
              "--set", "max_response_tokens=2048", code=2)
    assert "plus its dataset response (61 tokens) reaches 66, past 64" in out
    out = cli("eval", model, "--data", data, "--limit", "2", "--max-new-tokens", "50", code=2)
    assert out.strip().splitlines()[-1].endswith(
        "plus --max-new-tokens (50 tokens) reaches 65, past 64; lower --max-new-tokens "
        "to at most 49")


def test_a_bfloat16_model_says_it_comes_back_float32_unless_dtype_keeps_it(tmp_path,
                                                                          monkeypatch):
    model = saved_by_transformers(tmp_path / "bf16", "qwen2", dtype=torch.bfloat16,
                                  hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64)
    data = say_yes_data(tmp_path / "data")
    common = ["--model", model, "--data", data, "--preset", "sft", "--max-steps", "1", *SMALL]
    out = cli("train", "-o", tmp_path / "f32", *common)
    assert f"note: {model} is stored in bfloat16; this run trains and saves it in float32 " \
           "(dtype: float32); set dtype: bfloat16 to keep bfloat16" in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f32" / "final").dtype == torch.float32
    seen = opened_backends(monkeypatch)
    out = cli("train", "-o", tmp_path / "bf16run", *common, "--set", "dtype=bfloat16")
    assert "note:" not in out
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16run" / "final")
    assert again.dtype == torch.bfloat16
    ours = seen[0].model.state_dict()
    assert all(torch.equal(p, ours[n]) for n, p in again.state_dict().items())


@pytest.mark.parametrize("lora", [0, 4])
def test_a_tokenizer_without_pad_token_comes_back_without_one(tmp_path, monkeypatch, lora):
    model = saved_by_transformers(tmp_path / "m", "llama", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    seen = opened_backends(monkeypatch)
    cli("train", "--model", model, "--data", say_yes_data(tmp_path / "data"), "--preset", "sft",
        "-o", tmp_path / "run", "--max-steps", "1", "--set", f"lora_rank={lora}", *SMALL)
    assert seen[0].tokenizer.pad_token_id == EOS_ID  # padded with EOS in memory
    for saved in (tmp_path / "run" / "final", tmp_path / "run" / "checkpoints" / "step-000001"):
        assert "pad_token" not in json.loads((saved / "tokenizer_config.json").read_text())
        assert AutoTokenizer.from_pretrained(saved).pad_token is None


def test_gft_generate_past_gpt2s_positions_is_refused_too(tmp_path):
    model = saved_by_transformers(tmp_path / "gpt2", "gpt2", **GPT2)
    out = cli("generate", model, "-p", "hello", "--no-chat-template", "--max-new-tokens", "60",
              code=2)
    assert out.strip().splitlines()[-1].endswith(
        "the longest prompt (5 tokens) plus --max-new-tokens (60 tokens) reaches 65, past "
        "64; lower --max-new-tokens to at most 59")
    cli("generate", model, "-p", "hello", "--no-chat-template", "--max-new-tokens", "59")


def test_token_ids_past_the_embedding_are_refused_naming_the_row(tmp_path):
    model = saved_by_transformers(tmp_path / "m", "llama", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    tok = AutoTokenizer.from_pretrained(model)  # 259 tokens, as the model's embedding
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})  # id 259
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}"
                         "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: "
                         "{% endif %}")
    tok.save_pretrained(model)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Q{i}: say yes"},
        {"role": "assistant", "content": "yes"}]}) + "\n" for i in range(4)))
    common = ["--model", model, "--preset", "sft", "--max-steps", "1", *SMALL]
    out = cli("train", "--data", chat, "-o", tmp_path / "chat", *common, code=2)
    assert out.strip().splitlines()[-1] == (
        f"error: {chat}:1: field 'prompt': token id 259 ('<|im_start|>') is past the 259 "
        f"embedding rows of {model}: the tokenizer has 260 tokens, more than the model was "
        "saved with; resize the model's embeddings to the tokenizer "
        "(model.resize_token_embeddings(len(tokenizer))) and save it again")
    cli("train", "--data", say_yes_data(tmp_path / "plain"), "-o", tmp_path / "plain-run", *common)
    # gft generate: the same line (it was an IndexError from the embedding), naming the -p
    out = cli("generate", model, "-p", "hello", "-p", "hi", "--max-new-tokens", "2", code=2)
    assert out.strip().splitlines()[-1].startswith(
        "error: -p 1: field 'prompt': token id 259 ('<|im_start|>') is past the 259 embedding "
        "rows of")
    cli("generate", model, "-p", "hello", "--no-chat-template", "--max-new-tokens", "2")


def test_lora_over_gpt2_conv1d_fuses_transposed_and_resumes(tmp_path):
    model = saved_by_transformers(tmp_path / "gpt2", "gpt2", **GPT2)
    run = tmp_path / "run"
    cli("train", "--model", model, "--data", say_yes_data(tmp_path / "data"), "--preset", "sft",
        "-o", run, "--max-steps", "1", "--set", "lora_rank=4", "--set", "learning_rate=0.05",
        "--set", "lora_targets=[c_attn, attn.c_proj]", *SMALL)  # [32, 96] and square [32, 32]
    final = run / "final"
    assert json.loads((final / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    cli("fuse", final, tmp_path / "fused")
    ids = torch.from_numpy(batch(2).input_ids)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), final)
    with torch.no_grad():
        want = adapted.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model).eval()(ids).logits
    assert float((want - base).abs().max()) > 1e-2  # the adapter changes the model
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4)
    cli("train", "--resume", run, "--set", "max_steps=2")
    out = cli("convert", final, tmp_path / "mlx", "--to", "mlx-lm", code=2)
    assert "fan_in_fan_out: GPT-2's Conv1D layers), an architecture gft does not train on MLX" in out


def reference_update(model_dir: Path, batches) -> tuple[float, dict[str, np.ndarray]]:
    """The GFT loss at tau = 0 (token-mean of -A·log p over response tokens) and its
    gradients, from transformers' plain forward over the padded rows."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    total = 0.0
    for b in batches:
        ids = torch.from_numpy(b.input_ids)
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(b.attention).long()).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        mask = torch.from_numpy(b.response_mask[:, 1:]).float()
        loss = -(torch.from_numpy(b.advantages)[:, None] * logp * mask).sum() / b.n_tokens
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.numpy() for n, p in model.named_parameters()}


def test_mistral_sliding_window_update_is_transformers_forward(tmp_path):
    model = saved_by_transformers(tmp_path / "mistral", "mistral", hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64, sliding_window=8)
    seqs = shared_prompt_group(12, [5, 9, 3, 7], [1.0, -0.5, 0.25, -0.75])  # rows of 15-21
    batches = micro_batches(seqs, 8, 256)
    be = load_backend("torch", str(model))
    assert be._pack  # packing stays on for micro-batches within the window
    stats = be.accumulate_gradients(batches, tau=0.0, aggregation="token-mean")
    want_loss, want_grads = reference_update(model, batches)
    assert stats["loss"] == pytest.approx(want_loss, rel=1e-5)
    for name, g in be.gradients().items():
        np.testing.assert_allclose(g, want_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


SMALL_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, intermediate_size=64, head_dim=16)


@pytest.mark.parametrize("kind, shape", [
    ("llama", dict(SMALL_SHAPE, tie_word_embeddings=True)),
    ("gemma2", SMALL_SHAPE), ("phi3", SMALL_SHAPE), ("gpt_neox", SMALL_SHAPE),
    ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                 word_embed_proj_dim=32))])
def test_a_trained_model_reloads_in_transformers_as_gft_holds_it(tmp_path, kind, shape):
    model = saved_by_transformers(tmp_path / kind, kind, **shape)
    generation = json.loads((model / "generation_config.json").read_text())
    generation["eos_token_id"] = [EOS_ID, 10]
    (model / "generation_config.json").write_text(json.dumps(generation))
    be = load_backend("torch", str(model))
    be.train_step([batch(0)], 1e-2, tau=0.0, aggregation="token-mean")
    be.save_model(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.from_numpy(batch(1).input_ids)
    with torch.no_grad():
        want = be.model.eval()(ids).logits
        got = again(ids).logits
    assert float((got - want).abs().max()) == 0.0
    assert again.dtype == torch.float32
    def tied(m):
        return m.get_output_embeddings().weight is m.get_input_embeddings().weight
    assert tied(again) == tied(AutoModelForCausalLM.from_pretrained(model))
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [EOS_ID, 10]


def test_a_tokenizer_that_appends_eos_does_not_end_prompts_with_it(tmp_path):
    from tokenizers import Tokenizer, processors
    from gft.modelfiles import load_tokenizer
    from gft.rollout import encode_prompt, prepare_prompts
    from gft.types import Example
    model = saved_by_transformers(tmp_path / "m", "llama", hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64)
    core = Tokenizer.from_file(str(model / "tokenizer.json"))
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    core.save(str(model / "tokenizer.json"))
    tok = load_tokenizer(str(model))
    assert tok("hi").input_ids == [BOS_ID, 104, 105, EOS_ID]  # what the user's tokenizer does
    assert encode_prompt(Example("hi"), tok, None) == [BOS_ID, 104, 105]
    # an EOS the prompt itself writes stays
    assert encode_prompt(Example("hi</s>"), tok, None) == [BOS_ID, 104, 105, EOS_ID]
    rows = [Example("Q1: say yes\nA:", responses=(" yes",))]
    prepared = prepare_prompts(rows, tok, chat_template=None, max_prompt_tokens=64,
                               overflow="error")
    assert EOS_ID not in prepared.prompt_ids[0]
    # a tokenizer whose BOS is its EOS (GPT-2 style '<|endoftext|>' as both), prepended:
    # the prompt's own last token stays (it was cut: "" encodes as [EOS] there too)
    core.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", EOS_ID)])
    core.save(str(model / "tokenizer.json"))
    tok = load_tokenizer(str(model))
    assert tok("").input_ids == [EOS_ID]
    assert encode_prompt(Example("hi"), tok, None) == [EOS_ID, 104, 105]


def test_mlx_refuses_sequences_past_a_window_mlx_lm_does_not_slide(tmp_path):
    """mlx-lm builds Mistral (and Phi-3) with full attention where transformers slides
    `sliding_window` over every layer: within the window the two are one model, past it
    they differ (measured: loss -1.116 on MLX against -1.241 on torch, window 8). MLX
    refuses the longer sequences before any work, naming the window and the way out;
    within the window it trains."""
    pytest.importorskip("mlx_lm")
    from backends.mlx_config import unslid_window
    model = saved_by_transformers(tmp_path / "mistral", "mistral", hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=64,
                                  sliding_window=24)
    assert unslid_window(model) == 24
    qwen = saved_by_transformers(tmp_path / "qwen2", "qwen2", sliding_window=24,
                                 **SMALL_SHAPE)
    assert unslid_window(qwen) is None  # use_sliding_window off: transformers' layer_types
    data = say_yes_data(tmp_path / "data")  # prompts of 15 tokens
    common = ["--backend", "mlx", "--model", model, "--data", data, "--max-steps", "1",
              "--set", "progress=false", "--set", "eval_samples=0"]
    out = cli("train", "-o", tmp_path / "long", "--preset", "grpo", *common,
              "--set", "max_response_tokens=16", code=2)
    assert out.strip().splitlines()[-1] == (
        "error: transformers slides a 24-token attention window over every layer of this "
        "model (config.json sliding_window) and mlx-lm attends over the whole context: past "
        "the window the two would train different models (--backend torch applies the "
        "window), but the longest prompt (15 tokens) plus max_response_tokens (16 tokens) "
        "reaches 31, past 24; lower max_response_tokens to at most 9")
    cli("train", "-o", tmp_path / "fits", "--preset", "grpo", *common,
        "--set", "max_response_tokens=9")
    out = cli("generate", model, "--backend", "mlx", "-p", "Q1: say yes\nA:",
              "--no-chat-template", "--max-new-tokens", "12", code=2)
    assert out.strip().splitlines()[-1].endswith(
        "plus --max-new-tokens (12 tokens) reaches 26, past 24; lower --max-new-tokens to at "
        "most 10")


DROPOUT = 0.3
DROPOUT_MODELS = [
    ("gpt2", dict(GPT2, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, attn_pdrop=DROPOUT)),
    ("opt", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                 word_embed_proj_dim=32, dropout=DROPOUT, attention_dropout=DROPOUT,
                 activation_dropout=DROPOUT, layerdrop=DROPOUT)),
    ("llama", dict(SMALL_SHAPE, attention_dropout=DROPOUT)),
    ("gpt_neox", dict(SMALL_SHAPE, attention_dropout=DROPOUT, hidden_dropout=DROPOUT)),
    ("phi3", dict(SMALL_SHAPE, resid_pdrop=DROPOUT, embd_pdrop=DROPOUT,
                  attention_dropout=DROPOUT)),
    # Falcon reads its rates from the config in forward (found in review)
    ("falcon", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    hidden_dropout=DROPOUT, attention_dropout=DROPOUT))]


def update_losses(be, times: int = 2) -> list[float]:
    """The update's loss on one fixed batch, `times` times, without stepping."""
    return [be.accumulate_gradients([batch(0)], tau=0.0, aggregation="token-mean")["loss"]
            for _ in range(times)]


@pytest.mark.parametrize("kind, shape", DROPOUT_MODELS, ids=[k for k, _ in DROPOUT_MODELS])
def test_the_update_scores_without_the_models_dropout(tmp_path, kind, shape):
    model = saved_by_transformers(tmp_path / kind, kind, **shape)
    be = load_backend("torch", str(model))
    first, again = update_losses(be)
    assert first == again  # no random mask: the same network twice
    ids = torch.from_numpy(batch(0).input_ids)
    with torch.no_grad():  # and it is the network rollouts sample from (eval mode)
        be.model.train()
        train_logits = be.model(ids).logits
        eval_logits = be.model.eval()(ids).logits
    assert float((train_logits - eval_logits).abs().max()) == 0.0
    be.save_model(tmp_path / "saved")  # the model's own rates are kept for the user
    def rates(path: Path) -> dict:
        return {k: v for k, v in json.loads((path / "config.json").read_text()).items()
                if "drop" in k}
    assert rates(tmp_path / "saved") == rates(model) and DROPOUT in rates(model).values()
    kept = load_backend("torch", str(model), disable_dropout=False)
    first, again = update_losses(kept)
    assert first != again  # dropout as the config says: a new mask each forward


def test_lora_dropout_stays_when_the_models_is_off(tmp_path):
    from gft.lora import LoraConfig
    model = saved_by_transformers(tmp_path / "gpt2", "gpt2", **DROPOUT_MODELS[0][1])
    be = load_backend("torch", str(model), lora=LoraConfig(4, 8.0, 0.5, ("c_attn",)))
    rates = {n: m.p for n, m in be.model.named_modules()
             if isinstance(m, torch.nn.Dropout)}
    assert rates and all(p == (0.5 if "lora_dropout" in n else 0.0)
                         for n, p in rates.items()), rates
