"""The two Byzantine reproductions (benchmarks/reproduce/): --help, the skip on missing data, and one
tiny run each whose JSON table has the expected shape and finite values in [0, 1]."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["karimireddy_bucketing.py", "byzfl_benchmark.py"]
MNIST = Path(os.environ.get("ROBUSTFL_MNIST_DIR", ROOT.parent / "shared" / "data" / "mnist"))


def run(script, *args, timeout=50):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce" / script), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run(script, "--help")
    assert out.returncode == 0, out.stderr
    assert "--size" in out.stdout and "--seeds" in out.stdout and "--json" in out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_data_root_skips_with_a_message(script, tmp_path):
    out = run(script, "--data-root", str(tmp_path / "nowhere"), "--size", "tiny", "--seeds", "2")
    assert out.returncode == 77
    assert "MNIST not found" in out.stderr and "nowhere" in out.stderr


def test_one_seed_is_refused():
    out = run(SCRIPTS[0], "--seeds", "1", "--data-root", str(MNIST))
    assert out.returncode == 2 and "--seeds must be >= 2" in out.stderr


needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-images-idx3-ubyte.gz").exists(), reason="MNIST t10k files absent")


def run_tiny(script, tmp_path):
    """The script at its tiny size over two seeds: its stdout and the JSON it wrote."""
    path = tmp_path / "table.json"
    out = run(script, "--size", "tiny", "--seeds", "2", "--data-root", str(MNIST), "--json", str(path))
    assert out.returncode == 0, out.stderr
    return out, json.loads(path.read_text())


@needs_mnist
def test_tiny_karimireddy_table(tmp_path):
    out, got = run_tiny(SCRIPTS[0], tmp_path)
    assert {(r["rule"], r["attack"], r["bucketing"]) for r in got["table"]} == {("median", "alie", False),
                                                                               ("median", "alie", True)}
    for r in got["table"]:
        assert len(r["per_seed"]) == 2 and r["paper"] == "not found"
        assert 0 <= r["low"] <= r["mean"] <= r["high"] <= 1
    (d,) = got["differences"]
    assert all(math.isfinite(d[k]) for k in ("diff", "low", "high")) and d["low"] <= d["diff"] <= d["high"]
    assert "bucketing helps" in out.stdout and "| CM + bucketing | alie |" in out.stdout


@needs_mnist
def test_tiny_byzfl_table(tmp_path):
    out, got = run_tiny(SCRIPTS[1], tmp_path)
    assert len(got["seeds"]) == 2
    (cell,) = got["cells"]
    assert cell["rule"] == "median" and cell["worst_attack"] == "sign_flip" and cell["fraction"] == 0.2
    assert 0 <= cell["low"] <= cell["mean"] <= cell["high"] <= 1
    assert set(got["worst_case"]) == {"median"}
    assert "Worst case of each rule" in out.stdout
