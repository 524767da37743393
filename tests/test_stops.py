"""gft/stops.py and the backends' stop handling: every eos_token_id of
generation_config.json, the tokenizer's EOS and the config's `stop` end rollouts,
`gft generate` and evaluation on both backends."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from backends import SamplingConfig, load_backend
from gft.errors import ConfigError
from gft.stops import Stops, generation_eos_ids, model_stops
from gft.tiny import BOS_ID, EOS_ID, byte_tokenizer
from tests.helpers import scaled_tiny

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    sys.platform == "win32", reason="mlx"))]
PROMPTS = [[BOS_ID] + list(b"What is 3 plus 5?"), [BOS_ID] + list(b"Hello"),
           [BOS_ID, 120, 121], [BOS_ID] + list(b"Q: 12+7\nA:")]
GREEDY = SamplingConfig(max_new_tokens=12, greedy=True)


def _set_eos(model_dir: Path, eos) -> None:
    path = model_dir / "generation_config.json"
    cfg = json.loads(path.read_text())
    cfg["eos_token_id"] = eos
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return scaled_tiny(tmp_path_factory.mktemp("stops") / "m", arch="llama")


def _two_stop_ids(free: list[list[int]]) -> tuple[int, int, int, int]:
    """Two rows and two token ids such that row a first emits id A at position i and row b
    first emits id B at position j, and neither row meets the other id (or EOS) before."""
    for a, ra in enumerate(free):
        for b, rb in enumerate(free):
            if a == b:
                continue
            for i in range(1, 6):
                for j in range(1, 6):
                    A, B = ra[i], rb[j]
                    if A == B or EOS_ID in ra[:i + 1] + rb[:j + 1]:
                        continue
                    if A not in ra[:i] and B not in ra[:i + 1] and B not in rb[:j] \
                            and A not in rb[:j + 1]:
                        return a, i, b, j
    raise AssertionError(f"the test model's greedy rows offer no two distinct stop ids: {free}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollouts_stop_at_either_eos_id_of_generation_config(backend, model_dir, tmp_path):
    """generation_config.json lists two EOS ids (as Llama 3 and Qwen instruct models do):
    one row ends at the first, another at the second, each kept as its last token."""
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    free = load_backend(backend, str(model_dir)).generate(PROMPTS, GREEDY, 0)
    assert all(len(r) == GREEDY.max_new_tokens for r in free), "no row should end by itself"
    a, i, b, j = _two_stop_ids(free)
    two = tmp_path / "two-eos"
    shutil.copytree(model_dir, two)
    _set_eos(two, [free[a][i], free[b][j]])
    be = load_backend(backend, str(two))
    assert be.stops.ids == {EOS_ID, free[a][i], free[b][j]}
    out = be.generate(PROMPTS, GREEDY, 0)
    assert out[a] == free[a][:i + 1]
    assert out[b] == free[b][:j + 1]
    sampled = be.generate(PROMPTS * 2, SamplingConfig(max_new_tokens=12, temperature=1.0), 3)
    for row in sampled:  # sampled rollouts end at the first stop id, or run to the limit
        first = next((k for k, t in enumerate(row) if t in be.stops.ids), None)
        assert first == len(row) - 1 or (first is None and len(row) == 12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_key_ids_and_strings_end_generation(backend, model_dir):
    """`stop`: an id ends the row in the decode loop; a multi-token string cuts the row
    after the token that completes it."""
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    free = load_backend(backend, str(model_dir)).generate(PROMPTS, GREEDY, 0)
    row = free[0]
    tok = byte_tokenizer()
    target = tok.decode(row[1:4])  # three bytes: a string of several tokens
    be = load_backend(backend, str(model_dir), stop=[row[2]])
    assert be.generate(PROMPTS[:1], GREEDY, 0)[0] == row[:row.index(row[2]) + 1]
    if len(set(target)) > 1 and "\ufffd" not in target:  # a cut that decoding can see
        be = load_backend(backend, str(model_dir), stop=[target])
        assert be.stops.strings == (target,)
        cut = be.generate(PROMPTS[:1], GREEDY, 0)[0]
        assert cut == row[:len(cut)] and len(cut) <= 4 and target in tok.decode(cut)


def test_generation_config_eos_ids_int_list_or_absent(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert generation_eos_ids(tmp_path) == [7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert generation_eos_ids(tmp_path) == [7, 9]
    (tmp_path / "generation_config.json").unlink()
    assert generation_eos_ids(tmp_path) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_generation_config_the_eos_ids_of_config_json_end_rows(backend, model_dir,
                                                                         tmp_path):
    """A folder with no generation_config.json (or one naming no eos) whose config.json
    lists eos ids, as mlx-lm's load reads them and transformers builds its generation
    config from them: gft ended rows at the tokenizer's EOS only and ran on."""
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    free = load_backend(backend, str(model_dir)).generate(PROMPTS, GREEDY, 0)
    a, i, _, _ = _two_stop_ids(free)
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "generation_config.json").unlink()
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "eos_token_id": [EOS_ID,
                                                                             free[a][i]]}))
    be = load_backend(backend, str(bare))
    assert be.generate(PROMPTS, GREEDY, 0)[a] == free[a][:i + 1]
    if sys.platform != "win32":
        import mlx_lm
        assert mlx_lm.load(str(bare))[1].eos_token_ids == be.stops.ids


def test_model_stops_joins_tokenizer_generation_config_and_stop_key(tmp_path):
    tok = byte_tokenizer()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, 10]}))
    stops = model_stops(tok, tmp_path, ["</s>", 33, "\n\nQ:"])
    # "</s>" is one token (the EOS itself), "\n\nQ:" is four: matched on the text
    assert stops.ids == {EOS_ID, 10, 33}
    assert stops.strings == ("\n\nQ:",)
    assert model_stops(tok, tmp_path, "</x>").strings == ("</x>",)  # one string, not chars
    with pytest.raises(ConfigError, match="'stop'"):
        model_stops(tok, tmp_path, [3.5])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        model_stops(tok, tmp_path, [10**6])


def test_cut_and_ended_on_text():
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731
    stops = Stops(frozenset({0}), ("cd",))
    ids = [ord(c) for c in "abcdef"]
    assert stops.cut(ids, decode) == [ord(c) for c in "abcd"]
    assert stops.cut([ord("x")], decode) == [ord("x")]
    assert stops.ended([ord("a"), 0], decode) and stops.ended([ord(c) for c in "abcd"], decode)
    assert not stops.ended([ord("a"), ord("b")], decode) and not stops.ended([], decode)


def test_rollouts_ended_by_any_stop_are_not_truncated():
    from gft.rollout import build_groups
    from gft.types import Example
    tok = byte_tokenizer()
    stops = Stops(frozenset({EOS_ID, 10}), ("!?",))
    rollouts = [[65, 10], [65, EOS_ID], [65, 33, 63], [65, 66]]
    seqs = build_groups([Example("p")], [[BOS_ID]], rollouts, tokenizer=tok, num_offpolicy=0,
                        num_rollouts=4, max_response_tokens=8, stops=stops)
    assert [s.truncated for s in seqs] == [False, False, False, True]


def test_generate_uses_the_chat_template_as_trained_or_where_there_is_one(tmp_path):
    """`gft generate` wraps prompts in the chat template where the tokenizer has one (as
    mlx-lm does), except for a gft checkpoint trained on plain string prompts."""
    from gft.checkpoint import STATE_FILE
    from gft.trained import generate_chat_template
    tok = byte_tokenizer()
    assert tok.chat_template and generate_chat_template(str(tmp_path), tok) is True
    no_template = byte_tokenizer()
    no_template.chat_template = None
    assert generate_chat_template(str(tmp_path), no_template) is False
    for trained, expected in ((None, False), (False, False), (True, True)):
        (tmp_path / STATE_FILE).write_text(json.dumps(
            {"loop": {"step": 1}, "config": {"chat_template": trained}}))
        assert generate_chat_template(str(tmp_path), tok) is expected


def test_generate_cli_applies_the_template_by_default(model_dir):
    """The same prompt through `gft generate` with no flag and with --chat-template gives
    the same completion; --no-chat-template gives the raw prompt's."""
    from click.testing import CliRunner
    from cli import main
    args = ["generate", str(model_dir), "-p", "Hello", "--max-new-tokens", "8",
            "--backend", "torch"]
    runs = {flag: CliRunner().invoke(main, args + ([flag] if flag else []))
            for flag in (None, "--chat-template", "--no-chat-template")}
    assert all(r.exit_code == 0 for r in runs.values()), {k: r.output for k, r in runs.items()}
    assert runs[None].output == runs["--chat-template"].output
    assert runs[None].output != runs["--no-chat-template"].output


def test_a_runs_stop_is_recorded_in_gft_json_also_for_folders_written_before():
    """gft.json carries the run's `stop` (one string means a list of one); a checkpoint
    written before it did says it through its trainer_state.json."""
    from gft.checkpoint import model_record
    assert model_record({"config": {"stop": "</a>"}, "loop": {"step": 3}})["stop"] == ["</a>"]
    assert model_record({"config": {"stop": ["\n\n", 7]}, "loop": {}})["stop"] == ["\n\n", 7]
    assert model_record({"config": {}, "loop": {}})["stop"] == []
    # and how its evaluation scored, which `gft eval` repeats (tests/test_cli.py)
    record = model_record({"config": {"rewards": ["exact"], "answer_column": "solution",
                                      "max_response_tokens": 64}, "loop": {"step": 3}})
    assert record == {"chat_template": False, "stop": [], "rewards": ["exact"],
                      "answer_column": "solution", "max_response_tokens": 64, "step": 3}


def test_trained_stop_reads_the_record_then_the_trainer_state(tmp_path):
    from gft.checkpoint import MODEL_RECORD, STATE_FILE
    from gft.trained import trained_stop
    assert trained_stop(str(tmp_path)) == []  # not a gft run's model
    (tmp_path / STATE_FILE).write_text(json.dumps({"loop": {"step": 1},
                                                   "config": {"stop": "</a>"}}))
    assert trained_stop(str(tmp_path)) == ["</a>"]  # a checkpoint from before gft.json had it
    (tmp_path / MODEL_RECORD).write_text(json.dumps({"chat_template": False, "stop": ["X"]}))
    assert trained_stop(str(tmp_path)) == ["X"]
    (tmp_path / MODEL_RECORD).write_text(json.dumps({"stop": ["X", 3.5]}))  # hand-edited
    from gft.errors import ModelError
    with pytest.raises(ModelError, match=r"'stop' in gft.json: .* got 3.5"):
        trained_stop(str(tmp_path))


def test_generate_and_eval_end_where_the_run_stopped(tmp_path, monkeypatch):
    """A gft run's final/, copied out alone, ends completions at its run's `stop` (read
    from gft.json), as its rollouts and evaluation did; --stop adds more. Before, the
    output ran on past it, in silence."""
    from click.testing import CliRunner
    from cli import main
    from gft.checkpoint import MODEL_RECORD
    model = scaled_tiny(tmp_path / "final")
    args = ["generate", str(model), "-p", "Hello", "--max-new-tokens", "16",
            "--backend", "torch", "--no-chat-template"]
    def run(*extra):
        result = CliRunner().invoke(main, args + list(extra))
        assert result.exit_code == 0, result.output
        return result.output[:-1]  # click.echo's newline
    free = run()
    printable = [i for i, c in enumerate(free) if c.isascii() and c.isprintable()]
    # two printable bytes: two tokens, so the string is matched on the decoded text
    at = next(i for i in printable if i + 1 in printable and i + 2 < len(free))
    stop = free[at:at + 2]
    cut = free[:free.index(stop) + 2]
    assert cut != free
    (model / MODEL_RECORD).write_text(json.dumps({"chat_template": False, "stop": [stop],
                                                  "step": 4}))
    assert run() == cut
    other = free[printable[0]]  # --stop adds to the run's; one byte: a stop id
    assert printable[0] < at and run("--stop", other) == free[:printable[0] + 1]


def _greedy_hf(model_dir, prompt: list[int], n: int = 12) -> list[int]:
    """transformers' own greedy generate from the folder, as a user would call it."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def test_a_checkpoint_tells_transformers_and_mlx_lm_where_the_run_stopped(model_dir, tmp_path):
    """A run's one-token stops are listed after the model's own eos ids in the saved
    generation_config.json (every other field as the model had it), so transformers'
    GenerationConfig and generate() and mlx_lm.load end there too; the multi-token one
    cannot be listed and stays in gft.json only. Before, the file kept the model's EOS
    alone and both libraries ran on past where the run's rollouts ended."""
    from gft.checkpoint import MODEL_RECORD, save_checkpoint
    from gft.stops import STOP_EOS_KEY
    tok = byte_tokenizer()
    # a printable byte a greedy row first emits at position at > 0: a one-token stop string
    prompt, free, at, token = next(
        (p, free, i, t) for p in PROMPTS for free in [_greedy_hf(model_dir, p)]
        for i, t in enumerate(free) if 0 < i and 32 < t < 127 and t not in free[:i]
        and EOS_ID not in free[:i + 1])
    text = tok.decode([token])
    assert tok(text, add_special_tokens=False).input_ids == [token]
    stop = [text, "a longer stop"]
    be = load_backend("torch", str(model_dir), stop=stop, train=False)
    saved = save_checkpoint(be, tmp_path / "ck", {"config": {"stop": stop}, "loop": {"step": 1}})
    def read(folder):  # save_pretrained adds the transformers version that wrote it
        config = json.loads((folder / "generation_config.json").read_text())
        return {k: v for k, v in config.items() if k != "transformers_version"}
    before, after = read(model_dir), read(saved)
    assert after == {**before, "eos_token_id": [EOS_ID, token]}
    assert json.loads((saved / MODEL_RECORD).read_text())[STOP_EOS_KEY] == [token]
    from transformers import GenerationConfig
    assert GenerationConfig.from_pretrained(saved).eos_token_id == [EOS_ID, token]
    assert _greedy_hf(saved, prompt) == free[:at + 1]  # transformers stops there now
    if sys.platform != "win32":
        import mlx_lm
        assert mlx_lm.load(str(saved))[1].eos_token_ids == {EOS_ID, token}
        ran, ended = (mlx_lm.generate(*mlx_lm.load(str(folder)), prompt=prompt, max_tokens=12)
                      for folder in (model_dir, saved))
        assert ended == tok.decode(free[:at]) and ran.startswith(ended) and ran != ended
        on_mlx = save_checkpoint(load_backend("mlx", str(model_dir), stop=stop, train=False),
                                 tmp_path / "ck-mlx", {"config": {"stop": stop}, "loop": {}})
        assert read(on_mlx) == after  # the MLX backend's checkpoints say the same
    # a run from this folder without the stop starts from the model's own ids again
    again = load_backend("torch", str(saved), train=False)
    assert token not in again.stops.ids and again.stops.eos == (EOS_ID,)
    resaved = save_checkpoint(again, tmp_path / "ck2", {"config": {}, "loop": {"step": 2}})
    assert read(resaved) == before
    assert STOP_EOS_KEY not in json.loads((resaved / MODEL_RECORD).read_text())


def test_a_multi_token_stop_is_named_once_in_the_runs_log():
    """generation_config.json holds ids only: the run's log says which stops only gft
    reads from the saved folder, and how to give them to transformers."""
    from gft.stops import unsaved_stops_note
    tok = byte_tokenizer()
    assert unsaved_stops_note(model_stops(tok, "/nonexistent", ["\n", 7])) is None
    note = unsaved_stops_note(model_stops(tok, "/nonexistent", ["\n", "</a>"]))
    assert note.startswith("note: stop '</a>': more than one token") and "stop_strings" in note


def test_gft_fuse_lists_the_adapters_one_token_stops(model_dir, tmp_path):
    """An adapter folder has no generation_config.json (transformers and mlx-lm read the
    base's), so `gft fuse` writes the adapter's run's one-token stops into the fused
    model's, after the base's own eos ids, as a full model's checkpoint lists them."""
    from transformers import GenerationConfig
    from gft.checkpoint import MODEL_RECORD, save_checkpoint
    from gft.convert import fuse
    from gft.lora import LoraConfig
    from gft.stops import STOP_EOS_KEY
    stop = ["n", 33, "a longer stop"]
    be = load_backend("torch", str(model_dir), stop=stop,
                      lora=LoraConfig(4, 8.0, targets=("q_proj", "v_proj")))
    adapter = save_checkpoint(be, tmp_path / "adapter", {"config": {"stop": stop}, "loop": {}})
    assert not (adapter / "generation_config.json").exists()
    fuse(adapter, tmp_path / "fused", base=str(model_dir))
    assert GenerationConfig.from_pretrained(tmp_path / "fused").eos_token_id == \
        [EOS_ID, ord("n"), 33]
    record = json.loads((tmp_path / "fused" / MODEL_RECORD).read_text())
    assert record["stop"] == stop and record[STOP_EOS_KEY] == [ord("n"), 33]
    # fused into a base whose own run added an id its stop named: the adapter's run did
    # not stop there (it started from the base's own ids), so the fused model does not
    base = tmp_path / "base"
    shutil.copytree(model_dir, base)
    _set_eos(base, [EOS_ID, 44])
    (base / MODEL_RECORD).write_text(json.dumps({"stop": [44], STOP_EOS_KEY: [44]}))
    plain = save_checkpoint(load_backend("torch", str(base), lora=LoraConfig(
        4, 8.0, targets=("q_proj",))), tmp_path / "plain", {"config": {}, "loop": {}})
    fuse(plain, tmp_path / "fused-2", base=str(base))
    assert GenerationConfig.from_pretrained(tmp_path / "fused-2").eos_token_id == EOS_ID
