"""The replication command (benchmarks/replicate.py) runs end to end with tiny budgets:
warm-up, probes, the six methods in both training conditions, every split's evaluation,
the tables, the claims and the figures; every run stops at the policy-token budget; the
learning-rate sweep chooses on the validation split only."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gft.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "replicate.py"
METHODS = ("sft", "dft", "grpo", "gft", "sft>grpo", "sft>gft>grpo")
SPLITS = ("test", "test_big", "test_chain", "test_reword")


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("replicate")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny-test", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_report_has_the_tables_per_split_and_the_claims(replicated):
    out, _ = replicated
    text = (out / "REPLICATION.md").read_text()
    lines = text.splitlines()
    for head in ("| method | learning rate", "| method | steps per stage"):
        starts = [i for i, line in enumerate(lines) if line.startswith(head)]
        assert len(starts) == 2, head  # one table per training condition
        for start in starts:
            table = lines[start:start + 2 + 1 + len(METHODS)]
            assert [line.split("|")[1].strip() for line in table[2:]] == ["base", *METHODS]
    accuracy = lines[next(i for i, line in enumerate(lines)
                          if line.startswith("| method | learning rate"))]
    for split in SPLITS:
        assert f"{split} pass@1" in accuracy and f"{split} pass@2" in accuracy
        assert f"On `{split}`:" in text
    assert "Trained on correct expert" in text and "Trained on flawed expert" in text
    for claim in ("GFT beats SFT and DFT", "keeps policy entropy", "gradient spikes",
                  "SFT→GRPO underperforms", "SFT→GFT→GRPO is best"):
        assert claim in text
    for name in ("test_big", "test_chain", "test_reword", "train_flawed"):
        assert f"`{name}`" in text  # what each split measures is stated
    assert "python benchmarks/replicate.py --tiny-test" in text  # the exact command


def test_figures_are_written_and_small(replicated):
    out, _ = replicated
    text = (out / "REPLICATION.md").read_text()
    figures = sorted((out / "replication").glob("*.png"))
    names = {p.name for p in figures}
    assert {"compare-tokens.png", "overlay-steps.png", "curves-gft.png",
            "curves-sft-gft-grpo.png"} <= names
    for p in figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.stat().st_size < 150_000
        assert f"](replication/{p.name})" in text


def test_every_run_stopped_at_the_policy_token_budget(replicated):
    out, _ = replicated
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["plan"]) == set(METHODS)
    assert len(summary["results"]) == 2 * len(METHODS)
    budget = summary["setup"]["budget_tokens"]
    for result in summary["results"]:
        # stopped by tokens, within its last step's tokens of the budget, whatever the method
        assert budget <= result["tokens"] < budget + result["last_step_tokens"], result["name"]
        for split in ("valid", *SPLITS):
            assert 0.0 <= result[f"{split}/accuracy"] <= 1.0
        assert result["test/entropy"] > 0
        last = latest_checkpoint(Path(result["run_dir"]))  # final/ holds the model only
        data = json.loads((last / "trainer_state.json").read_text())["config"]["data"]
        assert Path(data).name == f"data-{result['condition']}"
    # the flawed condition trains on the generator's train_flawed rows, the clean one on train
    for condition, split in (("clean", "train"), ("flawed", "train_flawed")):
        assert (out / f"data-{condition}" / "train.jsonl").read_bytes() == \
            (out / "task" / f"{split}.jsonl").read_bytes()
    # a staged pipeline ran its stages in order
    metrics = out / "runs" / "clean" / "sft-grpo-s0-lr0.0003" / "metrics.jsonl"
    presets = [json.loads(line).get("preset") for line in metrics.read_text().splitlines()]
    assert [p for i, p in enumerate(presets) if p and p != presets[i - 1]] == ["sft", "grpo"]


def test_a_rerun_reuses_every_cached_run(replicated):
    out, _ = replicated
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny-test", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ": start" not in proc.stdout  # nothing trained or evaluated again


def _replicate_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gft_replicate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gft_replicate"] = module
    spec.loader.exec_module(module)
    return module


def test_a_cached_run_is_reused_only_for_the_same_spec(tmp_path):
    rep = _replicate_module()
    spec = {"name": "gft-s0", "run_dir": str(tmp_path / "run"),
            "values": {"preset": "gft", "max_steps": 10}, "depends": "base-a"}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(
        json.dumps({"fingerprint": rep.fingerprint(spec), "tokens": 1.0}))
    assert rep.cached(spec)["tokens"] == 1.0
    assert rep.cached({**spec, "log": "elsewhere.log"}) is not None  # not part of the result
    # another step count (a new --budget-tokens) or another base: stale, deleted
    assert rep.cached({**spec, "values": {"preset": "gft", "max_steps": 12}}) is None
    assert not (tmp_path / "run").exists()


class FakeRunner:
    """Answers specs with made-up accuracies: valid prefers one rate per method, the
    test splits the opposite, so choosing on a test split would show."""

    def __init__(self, best: dict[str, float]):
        self.best, self.seen = best, []

    def many(self, specs):
        self.seen += specs
        out = []
        for spec in specs:
            good = float(spec["lr"] == self.best[spec["method"]])
            out.append({"name": spec["name"], "method": spec["method"], "lr": spec["lr"],
                        "seed": spec["seed"], "condition": spec["condition"],
                        "valid/accuracy": good, "valid/reward": good,
                        **{f"{s}/accuracy": 1.0 - good for s in SPLITS}})
        return out


def test_the_sweep_chooses_each_methods_rate_on_the_validation_split(tmp_path):
    rep = _replicate_module()
    from benchmarks.replication_lib.plan import Base, StagePlan, run_all
    from benchmarks.replication_lib.setup import SETUPS
    from dataclasses import replace
    setup = replace(SETUPS["tiny-test"], lrs=(1e-4, 3e-4, 1e-3), conditions=("clean",))
    best = {"sft": 1e-3, "dft": 1e-4, "grpo": 3e-4, "gft": 1e-4, "sft>grpo": 3e-4,
            "sft>gft>grpo": 1e-3}
    steps = {m: [StagePlan("sft", 100, 10, 5)] for m in best}
    runner = FakeRunner(best)
    base = Base(tmp_path / "base", {}, "fp")
    results, sweep = run_all(setup, runner, steps, [0, 1, 2], base,
                             {"clean": tmp_path / "data"}, tmp_path)
    assert len(sweep) == 3 * len(best) and {r["seed"] for r in sweep} == {0}
    assert sorted((r["method"], r["seed"]) for r in results) == sorted(
        (m, s) for m in best for s in (0, 1, 2))
    for r in results:
        assert r["lr"] == best[r["method"]], r  # the validation winner, for every seed
    for spec in runner.seen:  # the same sweep for every method; the rate reaches gft
        assert spec["values"]["learning_rate"] == spec["lr"]
        assert spec["values"]["max_policy_tokens"] == setup.budget_tokens
    assert rep.lr_list("1e-5, 3e-5,1e-4") == (1e-5, 3e-5, 1e-4)


def test_a_claim_holds_only_where_the_seeds_separate_the_methods():
    """'held' when every seed's run is on the claimed side; higher means whose seeds
    overlap are 'held on the means only'; lower means 'did not hold'."""
    from benchmarks.replication_lib.report import accuracy_claims

    def runs(*accs):
        return [{"test/accuracy": a} for a in accs]
    groups = {"sft": runs(0.50, 0.55, 0.60), "dft": runs(0.40, 0.45, 0.50),
              "grpo": runs(0.30, 0.31, 0.32), "sft>grpo": runs(0.60, 0.62, 0.64),
              "sft>gft>grpo": runs(0.70, 0.71, 0.72)}
    claims = accuracy_claims({**groups, "gft": runs(0.61, 0.62, 0.63)}, "test")
    assert claims[0].startswith("**GFT beats SFT and DFT** (greedy pass@1): held (")
    assert "did not hold (grpo 0.310 vs sft>grpo 0.620" in claims[1]
    assert "**SFT→GFT→GRPO is best**: held (" in claims[2]
    claims = accuracy_claims({**groups, "gft": runs(0.45, 0.60, 0.75)}, "test")
    assert "held on the means only (within the spread over seeds)" in claims[0]
    claims = accuracy_claims({**groups, "gft": runs(0.30, 0.35, 0.40)}, "test")
    assert ": did not hold (gft 0.350 vs sft 0.550" in claims[0]


def test_what_to_pick_names_the_best_method_and_its_ties():
    from benchmarks.replication_lib.report import pick_lines
    runs = lambda *a: [{"test/accuracy": x} for x in a]  # noqa: E731
    lines = pick_lines({"sft": runs(0.80, 0.85, 0.90), "gft": runs(0.70, 0.84, 0.86),
                        "grpo": runs(0.10, 0.20, 0.30)})
    assert lines == ["in distribution (new phrasings of trained facts): **sft** (0.850); "
                     "not separated from it by the seeds: gft."]


def test_flaw_cost_pairs_the_seeds_and_names_the_least_and_most_hurt():
    from benchmarks.replication_lib.report import flaw_cost_lines

    def runs(method, accs):
        return [{"method": method, "seed": s, "test/accuracy": a} for s, a in enumerate(accs)]
    clean = {"sft": runs("sft", [0.9, 0.8]), "gft": runs("gft", [0.5, 0.4]),
             "grpo": runs("grpo", [0.4, 0.3])}
    flawed = {"sft": runs("sft", [0.7, 0.7]), "gft": runs("gft", [0.5, 0.3]),
              "grpo": runs("grpo", [0.4, 0.3])}
    text = "\n".join(flaw_cost_lines({"clean": clean, "flawed": flawed}))
    # sft: per-seed drops 0.2 and 0.1 -> mean 0.15, sample sd 0.0707
    assert "| sft | 0.850 ± 0.071 | 0.700 | +0.150 ± 0.071 |" in text  # no spread: no ±
    # gft: drops 0.0 and 0.1 -> 0.05; grpo reads no demonstrations and is left out of the pick
    assert "| gft | 0.450 ± 0.071 | 0.400 ± 0.141 | +0.050 ± 0.071 |" in text
    assert "least hurt by the flawed ones: **gft** (+0.050); most: **sft** (+0.150)" in text
    assert "Best on `test` after training on them: **sft** (0.700)" in text
    assert flaw_cost_lines({"clean": clean}) == []  # one condition: nothing to compare
