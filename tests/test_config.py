"""Config layering, presets and clear errors."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from gft.config import EMBEDDED_DEFAULT, PRESETS, TrainConfig, build_config
from gft.yamlconfig import parse_override, read_yaml
from gft.errors import ConfigError


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_match_the_table(name):
    cfg = build_config({"model": "m", "data": "d"}, {"preset": name})
    table = {"sft": (1, 0, "constant", 0.0), "dft": (1, 0, "constant", 1.0),
             "grpo": (0, 8, "grpo", 0.0), "gft": (4, 4, "grpo", 0.1)}[name]
    assert (cfg.num_offpolicy, cfg.num_rollouts, cfg.advantage, cfg.tau) == table


def test_paper_defaults_when_model_and_data_given():
    cfg = build_config({"model": "m", "data": "d"})
    assert (cfg.learning_rate, cfg.weight_decay, cfg.max_grad_norm) == (1e-6, 0.01, 1.0)
    assert (cfg.prompts_per_step, cfg.prompts_per_minibatch) == (128, 64)
    assert cfg.loss_aggregation == "token-mean"


def test_embedded_default_only_without_model_and_data():
    assert build_config().learning_rate == EMBEDDED_DEFAULT["learning_rate"]
    assert build_config({"data": "x"}).learning_rate == 1e-6


def test_layering_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("preset: sft\ntau: 0.3\nlearning_rate: 1e-4\n")
    cfg = build_config(read_yaml(p), {"tau": 0.5}, source=str(p))
    assert cfg.preset == "sft" and cfg.tau == 0.5 and cfg.num_rollouts == 0
    assert cfg.learning_rate == 1e-4


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learnig_rate'.*did you mean 'learning_rate'"):
        build_config({"learnig_rate": 1e-5}, source="c.yaml")


# Open-R1's GRPO recipe (recipes/.../grpo/config_demo.yaml), abridged: what a TRL user brings
OPEN_R1 = """\
# Model arguments
model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct
torch_dtype: bfloat16
bf16: true
learning_rate: 2.0e-05
num_generations: 16
max_completion_length: 1024
per_device_train_batch_size: 16
seed: 42
"""


def test_every_unknown_key_of_a_file_is_named_at_once_with_its_line(tmp_path):
    """A TRL config holds dozens of keys gft spells otherwise; the error named the first
    only, so a user ran gft once per key to learn the rest."""
    p = tmp_path / "grpo.yaml"
    p.write_text(OPEN_R1)
    with pytest.raises(ConfigError) as info:
        build_config(read_yaml(p), source=str(p))
    head, *lines = str(info.value).splitlines()
    assert head == f"{p}: 6 unknown keys (gft train --help-config lists gft's):"
    assert [line.split(":")[0] for line in lines] == [
        "  line 2", "  line 3", "  line 4", "  line 6", "  line 7", "  line 8"]
    assert "'model_name_or_path': TRL's model_name_or_path is gft's model" in lines[0]
    assert "'num_generations': TRL's num_generations (completions per prompt) is gft's " \
           "num_rollouts" in lines[3]
    # one unknown key stays one line, with its line number
    p.write_text("seed: 1\nlearnig_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(p))}:2: unknown key "
                                          "'learnig_rate' \\(did you mean 'learning_rate'"):
        build_config(read_yaml(p), source=str(p))


def test_trls_max_steps_minus_one_says_what_gft_calls_it():
    with pytest.raises(ConfigError, match="TRL's -1 .* leave max_steps out"):
        build_config({"max_steps": -1}, source="c.yaml")


@pytest.mark.parametrize("values, message", [
    ({"tau": -0.1}, "'tau' must be in"),
    ({"num_offpolicy": 0, "num_rollouts": 0}, "at least one response"),
    ({"num_offpolicy": 1, "num_rollouts": 0, "advantage": "grpo"}, "group of one"),
    ({"tau": "high"}, "'tau' must be float"),
    ({"advantage": "grpoo"}, "did you mean 'grpo'"),
    ({"prompts_per_step": 10, "prompts_per_minibatch": 4}, "multiple"),
    # each names the one key that is wrong and its value (it used to name all three)
    ({"temperature": 0}, r"^'temperature' must be > 0 \(rollouts sample\), got 0.0$"),
    ({"learning_rate": -1e-5}, r"^'learning_rate' must be > 0, got -1e-05$"),
    ({"top_p": 1.5}, r"^'top_p' must be in \(0, 1\], got 1.5$"),
    # Path("") is the working directory: `data: ""` trained on ./train.jsonl in silence
    ({"data": ""}, r"^'data' is an empty string; give a path, or null"),
    ({"model": " "}, r"^'model' is an empty string"),
    ({"output_dir": ""}, r"^'output_dir' is an empty string"),
    ({"eval_data": ""}, r"^'eval_data' is an empty string"),
    ({"eval_split": ""}, r"^'eval_split' must name a split$"),
])
def test_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": "m", **values})


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a config setting learning_rate twice
    trained with the lower one, in silence. A merge (<<: *anchor) may still be overridden."""
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1e-5\nmax_steps: 3\nlearning_rate: 1e-3\n")
    with pytest.raises(ConfigError) as excinfo:
        read_yaml(p)
    assert str(excinfo.value) == (f"{p}:3: invalid YAML: 'learning_rate' is given twice on "
                                  "lines 1 and 3; keep one")
    p.write_text("stages:\n  - {preset: sft, steps: 2, steps: 3}\n")
    with pytest.raises(ConfigError, match="'steps' is given twice on line 2"):
        read_yaml(p)
    p.write_text("base: &b {tau: 0.1, learning_rate: 1e-5}\nstage:\n  <<: *b\n  tau: 0.2\n")
    assert read_yaml(p)["stage"] == {"tau": 0.2, "learning_rate": 1e-5}


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tau: 0.1\nlr: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        read_yaml(p)


def test_on_and_off_settings_read_the_way_yaml_writes_them(tmp_path):
    """YAML 1.1 reads `on` / `off` as booleans: a setting whose choices are on / off takes
    them either way, from a file or from --set."""
    p = tmp_path / "c.yaml"
    p.write_text("rollout_graphs: on\n")
    assert build_config(read_yaml(p), source=str(p)).rollout_graphs == "on"
    key, value = parse_override("rollout_graphs=off")
    assert build_config(None, {key: value}).rollout_graphs == "off"
    assert build_config(None, {"rollout_graphs": "auto"}).rollout_graphs == "auto"
    with pytest.raises(ConfigError, match="'trust_remote_code' must be bool"):
        build_config(None, {"trust_remote_code": "on"})
    with pytest.raises(ConfigError, match="'rollout_graphs' must be one of auto, on, off"):
        build_config(None, {"rollout_graphs": "yes please"})


def test_override_parsing():
    assert parse_override("tau=0.2") == ("tau", 0.2)
    assert parse_override("max_steps=null") == ("max_steps", None)
    assert parse_override("rewards=[math, exact]") == ("rewards", ["math", "exact"])
    with pytest.raises(ConfigError):
        parse_override("tau")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=20), st.one_of(st.none(), st.booleans(), st.integers(),
                                                        st.floats(allow_nan=True), st.text(max_size=10),
                                                        st.lists(st.integers(), max_size=3))))
def test_any_mapping_loads_or_raises_config_error(values):
    try:
        cfg = build_config(values)
    except ConfigError:
        return
    assert isinstance(cfg, TrainConfig)


def test_scientific_notation_reads_as_a_number_everywhere(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-5` as a string; TRL and mlx-lm configs write learning
    rates and weights that way. Top-level keys were coerced, but a reward weight or a
    stage's value is not checked against a float field: `weight: 1e-1` stopped the run."""
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 1e-5\nadam_eps: 1.0e8\n"
                 "rewards:\n  - {name: math, weight: 1e-1}\n"
                 "stages:\n  - {preset: sft, steps: 2, learning_rate: 2E-4}\n")
    raw = read_yaml(p)
    assert raw["rewards"][0]["weight"] == 0.1
    assert raw["stages"][0]["learning_rate"] == 2e-4
    cfg = build_config(raw, source=str(p))
    assert (cfg.learning_rate, cfg.adam_eps) == (1e-5, 1e8)
    from gft.rewards import parse_reward_specs
    assert parse_reward_specs(cfg.rewards)[0].weight == 0.1
    assert parse_override("rewards=[{name: math, weight: 5e-1}]") == (
        "rewards", [{"name": "math", "weight": 0.5}])
    assert parse_override("learning_rate=1e-5") == ("learning_rate", 1e-5)
    # a count written in scientific notation is a count; a fraction is not
    assert build_config(None, {"max_steps": 1e4, "seed": 2.0}).max_steps == 10000
    with pytest.raises(ConfigError, match="'max_steps' must be int or NoneType, got 1.5"):
        build_config(None, {"max_steps": 1.5})
    # not numbers: left as text
    assert parse_override("stop=[1e, e5, .e5, 1e-5x]") == ("stop", ["1e", "e5", ".e5", "1e-5x"])


def test_home_in_config_paths_is_expanded(tmp_path, monkeypatch):
    """`model: ~/models/m` in a YAML file (or --set model=~/...) is where the shell would
    have put it: the user's home (bug: 'no such model directory', and output_dir created a
    directory literally named '~' in the working directory)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    p = tmp_path / "job.yaml"
    p.write_text("model: ~/models/m\ndata: ~/data\neval_data: ~/held-out.jsonl\n"
                 "output_dir: ~/runs/x\n")
    cfg = build_config(read_yaml(p))
    assert (cfg.model, cfg.data, cfg.eval_data, cfg.output_dir) == (
        str(tmp_path / "models/m"), str(tmp_path / "data"), str(tmp_path / "held-out.jsonl"),
        str(tmp_path / "runs/x"))
    cfg = build_config({"model": "org/name", "data": "d"}, {"eval_data": "valid"})
    assert (cfg.model, cfg.eval_data) == ("org/name", "valid")  # a hub id, a split name: as given
