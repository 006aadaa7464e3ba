"""The benchmark commands run end to end (tiny durations: this checks they work, not speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_serve_benchmark_writes_its_table(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--duration", "1", "--warmup", "0.3",
         "--scenario", "C=1, uint8", "--scenario", "C=4", "--variant", "two@.:--workers=2",
         "--out", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    assert "ceiling: stock ONNX Runtime in-process (InferenceSession(path, providers=" \
           "['CPUExecutionProvider']), default SessionOptions" in table
    rows = re.findall(r"^\| (C=[^|]+) \| (\w+) \| ([\d,]+) \| ([\d,]+) \|.*\| (\d+) \| "
                      r"[\d,]+ / [\d,]+ \(batch (\d+)\) \| ([\d.]+) \| [\d.]+ / [\d.]+ \| "
                      r"([-\d.]+) / ([-\d.]+) / ([-\d.]+) \|$", table, flags=re.MULTILINE)
    assert [(name.strip(), server, int(batch)) for name, server, *_, batch, _r, _f, _o, _n
            in rows] == [("C=1, uint8", "convserve", 1), ("C=1, uint8", "two", 1),
                         ("C=4 x 32 images, float32", "convserve", 32),
                         ("C=4 x 32 images, float32", "two", 32)]
    for _name, _server, requests, _images, errors, _batch, ratio, floor, ort, _own in rows:
        assert int(requests.replace(",", "")) > 0 and int(errors) == 0 and float(ratio) > 0
        assert float(floor) > 0 and float(ort) > 0
    assert "transport floor" in table and "server RSS after the run" in table


def test_serve_benchmark_refuses_an_unknown_scenario(repo_root: Path) -> None:
    result = subprocess.run([sys.executable, "benchmarks/serve.py", "--scenario", "C=999"],
                            cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no scenario matches" in result.stderr


@pytest.mark.slow
def test_train_benchmark_compares_both_loops(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/train.py", "--train-images", "256", "--epochs", "2",
         "--device", "cpu", "--out", str(out)],
        cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = out.read_text()
    rows = dict(re.findall(r"^\| (tutorial|convserve) \| 64 \| ([\d,]+) \|", table, re.MULTILINE))
    assert set(rows) == {"tutorial", "convserve"}
    assert all(int(v.replace(",", "")) > 0 for v in rows.values())
    ratio = float(re.search(r"ratio convserve / tutorial: ([\d.]+)", table).group(1))
    # The table rounds images/s to integers (±0.5 each) and the ratio to 2 decimals: the ratio
    # must lie within what those roundings allow (wide when a loaded machine trains slowly).
    convserve, tutorial = (int(rows[loop].replace(",", "")) for loop in ("convserve", "tutorial"))
    assert (convserve - 0.5) / (tutorial + 0.5) - 0.005 <= ratio \
        <= (convserve + 0.5) / (tutorial - 0.5) + 0.005


@pytest.mark.slow
def test_the_profile_script_samples_a_live_server_per_stage(repo_root: Path, tmp_path: Path
                                                            ) -> None:
    out = tmp_path / "profile.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/profile_serve.py", "--callers", "8", "--seconds", "2",
         "--out", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    shares = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) % \|$", out.read_text(), re.MULTILINE))
    assert "ONNX Runtime (Session.run)" in shares, shares
    assert sum(map(float, shares.values())) == pytest.approx(100, abs=0.5)


def test_job_queue_benchmark_measures_files_and_postgresql(repo_root: Path, tmp_path: Path,
                                                           postgres_url: str) -> None:
    """Both job stores, tiny sizes: every check passes and every figure is there."""
    result = subprocess.run(
        [sys.executable, "benchmarks/job_queue.py", "--backends", "files,postgresql",
         "--jobs-url", postgres_url, "--jobs", "12", "--trainers", "1,3", "--events", "10",
         "--store", str(tmp_path)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    results = {r["backend"]: r for r in map(json.loads, lines[:2])}
    assert set(results) == {"files", "postgresql"}
    assert results["postgresql"]["store"].startswith("PostgreSQL ")
    for backend in results.values():
        for trainers in (1, 3):
            claims = backend[f"claims{trainers}"]
            assert len(claims["claims_by_trainer"]) == trainers and claims["each_claimed_once"]
        assert backend["watch"]["received"] == 10
        assert backend["watch"]["latency_ms"]["p50"] > 0
    assert re.search(r"^\| postgresql \| [\d,]+ / [\d,]+ \| ", result.stdout, re.MULTILINE)


def test_store_benchmark_measures_both_backends(repo_root: Path, tmp_path: Path, s3_weed) -> None:
    """benchmarks/store.py at tiny sizes (its own SeaweedFS, one replica per backend): every
    phase ran on both backends and each promotion reached the replica."""
    out = tmp_path / "store.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/store.py", "--rounds", "1", "--replicas", "1",
         "--poll-calls", "20", "--big-mb", "1", "--idle-s", "1", "--poll-interval-s", "0.2",
         "--json", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    samples = json.loads(out.read_text())
    for backend in ("directory", "s3"):
        assert len(samples["polls"][backend]["seconds"]) == 20
        assert all(samples["downloads"][backend][v]["cold"] for v in ("1", "2"))
        [promotion] = samples["replicas"][backend]["promotions"]
        assert len(promotion["replica_s"]) == 1 and 0 < promotion["replica_s"][0] < 30
    assert re.search(r"^\| s3 \| GET models/PROMOTED", result.stdout, re.MULTILINE)
