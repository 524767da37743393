"""The replication command (benchmarks/replicate.py) runs end to end with tiny budgets:
warm-up, probes, the six methods, evaluation, the table, the claims and the figures."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "replicate.py"
METHODS = ("sft", "dft", "grpo", "gft", "sft>grpo", "sft>gft>grpo")


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


def test_report_has_the_table_and_the_claims(replicated):
    out, _ = replicated
    text = (out / "REPLICATION.md").read_text()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | steps"))
    table = lines[start:start + 2 + 1 + len(METHODS)]
    names = [line.split("|")[1].strip() for line in table[2:]]
    assert names == ["base", *METHODS]
    assert "greedy pass@1" in table[0] and "pass@2" in table[0]
    for claim in ("GFT beats SFT and DFT", "keeps policy entropy", "gradient spikes",
                  "SFT→GRPO underperforms", "SFT→GFT→GRPO is best"):
        assert claim in text
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


def test_every_run_spent_its_planned_steps_and_counted_tokens(replicated):
    out, _ = replicated
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["steps"]) == set(METHODS)
    for result in summary["results"]:
        planned = sum(n for _, n in result["stages"])
        assert result["steps"] == planned
        assert result["tokens"] > 0
        assert 0.0 <= result["test/accuracy"] <= 1.0
        assert result["test/entropy"] > 0
    # the staged pipeline really ran its stages in order
    metrics = out / "runs" / "sft-gft-grpo-s0" / "metrics.jsonl"
    presets = [json.loads(line).get("preset") for line in metrics.read_text().splitlines()]
    assert [p for i, p in enumerate(presets) if p and p != presets[i - 1]] == ["sft", "gft", "grpo"]


def test_a_rerun_reuses_every_cached_run(replicated):
    out, _ = replicated
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny-test", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
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
