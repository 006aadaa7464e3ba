"""Tests for convserve.store.directory: real files, real processes (tests/store_worker.py), no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import pytest

from convserve.contracts.errors import IntegrityError, InvalidJobId, StoreError, VersionNotFound
from convserve.contracts.model_card import GateDecision
from convserve.store.base import HistoryEntry, ModelStore, PublishResult
from convserve.store.directory import DirectoryStore
from tests.barrier import release_when_ready
from tests.conftest import REPO_ROOT
from tests.store.conftest import MODEL_BYTES

WORKER = REPO_ROOT / "tests" / "store_worker.py"


# ----------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def accuracy_gate(store: ModelStore, accuracy: float, seen: list | None = None):
    """The same gate as the worker: promote iff strictly better than the champion."""

    def decide(champion: int | None) -> GateDecision:
        if seen is not None:
            seen.append(champion)
        best = None if champion is None else store.card(champion)["metrics"]["onnx_val_accuracy"]
        promoted = best is None or accuracy > best
        return GateDecision(promoted, (f"accuracy {accuracy} vs {best}",))

    return decide


def publish(store: ModelStore, model: Path, accuracy: float, **kw) -> PublishResult:
    card = {"metrics": {"onnx_val_accuracy": accuracy}, "dataset": {"name": "cifar10"}}
    kw.setdefault("actor", "job:test")
    return store.publish(model, card, accuracy_gate(store, accuracy), **kw)


def snapshot(models_dir: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under models/ with its mode and contents."""
    return {
        str(p.relative_to(models_dir)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
        for p in sorted(models_dir.rglob("*"))
    }


def tmp_dirs(store: ModelStore) -> list[Path]:
    return sorted(store.models_dir.glob(".tmp-*"))


def run_worker(
    root: Path | str, model: Path, accuracy: float, *args: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKER), str(root), str(model), str(accuracy), *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def start_workers(root: Path | str, jobs: list[tuple[Path, float]], hold: float, *,
                  scratch: Path | None = None) -> list[dict]:
    """Start workers together (one barrier) and return their parsed results. `root` is a store
    directory or an s3:// URL (then `scratch` holds the barrier and each worker's cache)."""
    scratch = scratch or Path(root).parent
    barrier = Path(tempfile.mkdtemp(prefix="barrier-", dir=scratch))
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(root), str(model), str(acc),
             "--hold-seconds", str(hold), "--barrier", str(barrier),
             *(["--work-dir", str(scratch / f"worker-{n}")] if str(root).startswith("s3://")
               else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, (model, acc) in enumerate(jobs)
    ]  # fmt: skip
    release_when_ready(barrier, len(procs))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


# ----------------------------------------------------------------------------- publish


def test_first_publish_creates_version_1(store: ModelStore, make_model) -> None:
    model = make_model()
    seen: list = []
    card = {"metrics": {"onnx_val_accuracy": 0.7}, "dataset": {"name": "cifar10"}, "x": [1, 2]}

    result = store.publish(
        model, card, accuracy_gate(store, 0.7, seen), actor="job:j1", job_id="j1"
    )

    assert seen == [None]
    assert result.promoted and result.version == 1 and result.previous is None
    assert result.decision.promoted is True
    assert store.versions() == [1]
    assert store.promoted_version() == 1
    assert (store.models_dir / "PROMOTED").read_text().strip() == "1"
    assert store.open_version(1).path == store.models_dir / "1" / "model.onnx"
    assert store.model_path(1).read_bytes() == model.read_bytes()
    for name in ("model.onnx", "card.json"):
        assert stat.S_IMODE((store.models_dir / "1" / name).stat().st_mode) == 0o444

    stored = store.card(1)
    assert stored["sha256"] == sha256(model)
    assert stored["version"] == 1 and stored["job_id"] == "j1"
    assert stored["gate"] == result.decision.to_dict()
    assert stored["x"] == [1, 2] and stored["dataset"] == {"name": "cifar10"}
    assert datetime.fromisoformat(stored["created_at"]).utcoffset().total_seconds() == 0

    [entry] = store.history()
    assert (entry.version, entry.previous, entry.actor) == (1, None, "job:j1")
    assert entry.reason == result.decision.reason
    assert not tmp_dirs(store)


def test_rejected_decision_leaves_models_untouched(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.8)
    before = snapshot(store.models_dir)
    seen: list = []

    result = store.publish(
        make_model(), {"metrics": {"onnx_val_accuracy": 0.5}}, accuracy_gate(store, 0.5, seen),
        actor="job:worse",
    )  # fmt: skip

    assert seen == [1]
    assert result == PublishResult(False, None, 1, result.decision)
    assert result.decision.promoted is False
    assert snapshot(store.models_dir) == before
    assert store.versions() == [1] and store.promoted_version() == 1 and len(store.history()) == 1


def test_better_model_becomes_version_2(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.6)
    better = make_model()

    result = publish(store, better, 0.9, actor="job:b")

    assert (result.promoted, result.version, result.previous) == (True, 2, 1)
    assert store.versions() == [1, 2] and store.promoted_version() == 2
    assert store.card(2)["sha256"] == sha256(better)
    assert [(e.version, e.previous, e.actor) for e in store.history()] == [
        (1, None, "job:test"),
        (2, 1, "job:b"),
    ]


@pytest.mark.parametrize(
    "decision",
    [None, {"promoted": True, "reason": "a dict, not a GateDecision"}, "promoted"],
)
def test_malformed_decision_is_refused(store: ModelStore, make_model, decision) -> None:
    with pytest.raises(StoreError, match=r"decide\(\) must return a GateDecision"):
        store.publish(make_model(), {}, lambda champion: decision, actor="job:x")
    assert store.versions() == [] and store.promoted_version() is None and not tmp_dirs(store)


def test_failing_decide_releases_the_lock(store: ModelStore, make_model) -> None:
    def boom(champion: int | None) -> GateDecision:
        raise RuntimeError("gate crashed")

    with pytest.raises(RuntimeError, match="gate crashed"):
        store.publish(make_model(), {}, boom, actor="job:x")
    assert publish(store, make_model(), 0.5).version == 1  # would hang if the lock leaked


def test_missing_model_file_is_refused(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="expected a model file"):
        publish(store, tmp_path / "nope.onnx", 0.5)


# ----------------------------------------------------------------------------- concurrency


def test_concurrent_publishers_are_serialised(store: ModelStore, make_model) -> None:
    results = start_workers(store.root, [(make_model(), 0.6), (make_model(), 0.8)], hold=0.5)

    first, second = sorted(results, key=lambda r: r["decision"]["entered"])
    # They really contended: the second asked for the lock while the first held it ...
    assert second["requested"] < first["decision"]["left"]
    # ... and only decided after the first had finished.
    assert first["decision"]["left"] <= second["decision"]["entered"]
    assert first["decision"]["champion_seen"] is None and first["version"] == 1
    assert second["decision"]["champion_seen"] == 1  # saw the first's result, not a stale None

    first_accuracy = store.card(1)["metrics"]["onnx_val_accuracy"]
    assert second["promoted"] == (first_accuracy == 0.6)
    assert store.versions() == ([1, 2] if second["promoted"] else [1])
    assert store.card(store.promoted_version())["metrics"]["onnx_val_accuracy"] == 0.8
    assert len(store.history()) == len(store.versions())


def test_many_publishers_keep_a_consistent_chain(store: ModelStore, make_model) -> None:
    accuracies = [0.3, 0.9, 0.5, 0.7]
    results = start_workers(store.root, [(make_model(), a) for a in accuracies], hold=0.1)

    champion = None
    previous_left = 0.0
    for r in sorted(results, key=lambda r: r["decision"]["entered"]):
        assert r["decision"]["entered"] >= previous_left  # decide() calls never overlap
        assert r["decision"]["champion_seen"] == champion
        if r["promoted"]:
            assert r["previous"] == champion
            champion = r["version"]
        previous_left = r["decision"]["left"]

    assert store.promoted_version() == champion
    assert store.card(champion)["metrics"]["onnx_val_accuracy"] == 0.9
    history = store.history()
    assert [e.version for e in history] == store.versions()
    assert [e.previous for e in history] == [None] + [e.version for e in history[:-1]]
    accs = [store.card(e.version)["metrics"]["onnx_val_accuracy"] for e in history]
    assert accs == sorted(accs) and len(set(accs)) == len(accs)


# ----------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize(
    ("point", "versions_after", "pointer_after"),
    [
        ("copy", [1], 1),
        ("before_rename", [1], 1),
        ("before_pointer", [1, 2], 1),
        ("before_history", [1, 2], 2),
    ],
)
def test_sigkill_during_publish_leaves_store_consistent(
    store: ModelStore, make_model, point: str, versions_after: list[int], pointer_after: int
) -> None:
    publish(store, make_model(), 0.5)
    candidate = make_model()

    proc = run_worker(store.root, candidate, 0.9, "--crash-at", point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    reopened = DirectoryStore(store.root)
    assert reopened.versions() == versions_after
    assert reopened.promoted_version() == pointer_after
    for version in reopened.versions():
        reopened.open_version(version)
    assert len(reopened.history()) == 1  # the killed publish never recorded history
    if point == "copy":
        [tmp] = tmp_dirs(reopened)
        assert 0 < (tmp / "model.onnx").stat().st_size < MODEL_BYTES  # died mid-copy
    if point == "before_rename":
        [tmp] = tmp_dirs(reopened)
        assert sha256(tmp / "model.onnx") == sha256(candidate)

    result = publish(reopened, make_model(), 0.95, actor="job:next")

    expected = max(versions_after) + 1
    assert (result.promoted, result.version, result.previous) == (True, expected, pointer_after)
    assert reopened.versions() == versions_after + [expected]
    assert reopened.promoted_version() == expected
    reopened.open_version(expected)
    assert not tmp_dirs(reopened)
    history = reopened.history()
    assert history[-1].version == expected and history[-1].previous == pointer_after
    if point == "before_history":
        # The pointer move without a history record is recorded before the next promotion.
        assert (history[1].version, history[1].previous, history[1].actor) == (
            2, 1, "store:recovery"
        )  # fmt: skip
        assert len(history) == 3
    else:
        assert len(history) == 2


def test_stale_tmp_dirs_are_ignored_and_cleaned(store: ModelStore, make_model) -> None:
    stale = store.models_dir / ".tmp-stale"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"partial")
    (stale / "model.onnx").chmod(0o444)

    assert store.versions() == []
    assert publish(store, make_model(), 0.5).version == 1
    assert not stale.exists()


def test_version_numbers_are_never_reused(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)
    store.promote(1, reason="rollback", actor="operator:ann")
    for f in (store.models_dir / "2").iterdir():
        f.unlink()
    (store.models_dir / "2").rmdir()  # an operator deletes the bad version

    assert publish(store, make_model(), 0.7).version == 3


def test_torn_history_line_is_ignored_then_truncated(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    history_file = store.models_dir / "history.jsonl"
    with open(history_file, "a") as f:
        f.write('{"version": 9, "prev')  # a crash mid-append

    assert [e.version for e in store.history()] == [1]
    publish(store, make_model(), 0.6)
    assert [e.version for e in store.history()] == [1, 2]
    assert all(json.loads(line) for line in history_file.read_text().splitlines())


# ----------------------------------------------------------------------------- integrity


def corrupt(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_model_fails_verify_and_cannot_be_promoted(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)
    corrupt(store.model_path(1))
    before = snapshot(store.models_dir)

    with pytest.raises(IntegrityError, match="sha256"):
        store.open_version(1)
    with pytest.raises(IntegrityError):
        store.promote(1, reason="rollback", actor="operator:ann")

    assert store.promoted_version() == 2
    assert snapshot(store.models_dir) == before
    store.open_version(2)


def test_missing_or_unreadable_card_is_an_integrity_error(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    card = store.models_dir / "1" / "card.json"
    card.chmod(0o644)
    card.write_text("{not json")
    with pytest.raises(IntegrityError, match="card"):
        store.open_version(1)
    card.unlink()
    with pytest.raises(IntegrityError, match="card"):
        store.card(1)


def test_missing_model_file_is_an_integrity_error(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    store.model_path(1).unlink()
    with pytest.raises(IntegrityError, match="model.onnx"):
        store.open_version(1)


def test_dangling_pointer_is_reported_and_repairable(store: ModelStore, make_model) -> None:
    assert store.promoted_version() is None
    publish(store, make_model(), 0.5)
    (store.models_dir / "PROMOTED").write_text("7\n")

    with pytest.raises(IntegrityError, match="version 7"):
        store.promoted_version()
    entry = store.promote(1, reason="repair pointer", actor="operator:ann")

    assert entry.previous == 7 and store.promoted_version() == 1


# ----------------------------------------------------------------------------- promote


def test_rollback_moves_pointer_and_is_recorded(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)

    entry = store.promote(1, reason="v2 misclassifies trucks", actor="operator:ann")

    assert store.promoted_version() == 1
    assert isinstance(entry, HistoryEntry)
    assert store.history()[-1] == entry
    assert (entry.version, entry.previous, entry.reason, entry.actor) == (
        1, 2, "v2 misclassifies trucks", "operator:ann"
    )  # fmt: skip
    assert store.versions() == [1, 2]  # rollback deletes nothing


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_promote_requires_a_reason(store: ModelStore, make_model, reason) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)
    with pytest.raises(StoreError, match="reason"):
        store.promote(1, reason=reason, actor="operator:ann")
    assert store.promoted_version() == 2 and len(store.history()) == 2


def test_unknown_version_raises_version_not_found(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    for call in (store.card, store.model_path, store.open_version):
        with pytest.raises(VersionNotFound):
            call(5)
    with pytest.raises(VersionNotFound):
        store.promote(5, reason="pin", actor="operator:ann")
    with pytest.raises(VersionNotFound):
        store.card(0)
    assert store.promoted_version() == 1


# ----------------------------------------------------------------------------- jobs


@pytest.mark.parametrize("job_id", ["../x", "a/b", "", "x" * 65, ".", "..", "a b", "a\n", None])
def test_job_dir_refuses_bad_ids(store: ModelStore, job_id) -> None:
    with pytest.raises(InvalidJobId):
        store.work.job_dir(job_id, create=True)
    assert store.work.job_ids() == []


def test_job_dirs(store: ModelStore) -> None:
    path = store.work.job_dir("job-2_b", create=False)
    assert path == store.work.jobs_dir / "job-2_b" and not path.exists()
    assert store.work.job_dir("job-2_b", create=True).is_dir()
    store.work.job_dir("A1", create=True)
    store.work.job_dir("x" * 64, create=True)
    (store.work.jobs_dir / ".hidden").mkdir()  # not a valid id: not listed
    assert store.work.job_ids() == sorted(["A1", "job-2_b", "x" * 64])


def test_publish_refuses_bad_job_id(store: ModelStore, make_model) -> None:
    with pytest.raises(InvalidJobId):
        publish(store, make_model(), 0.5, job_id="../evil")
    assert store.versions() == []


# ----------------------------------------------------------------------------- misc


def test_format_versions_table(store: ModelStore, make_model) -> None:
    from convserve.cli.models import format_versions_table

    publish(store, make_model(), 0.5, job_id="j1")
    store.publish(make_model(), {}, lambda c: GateDecision(True, ("forced",)), actor="x")

    lines = format_versions_table(store).splitlines()

    assert lines[0].split() == ["VERSION", "P", "CREATED_AT", "DATASET", "VAL_ACC", "JOB_ID"]
    row1, row2 = lines[1].split(), lines[2].split()
    assert row1[0] == "1" and row1[2:] == ["cifar10", "0.5000", "j1"]
    assert row2[:2] == ["2", "*"] and row2[3:] == ["-", "-", "-"]
    empty = format_versions_table(DirectoryStore(store.root / "empty")).splitlines()
    assert [line.split() for line in empty] == [lines[0].split()]


def test_import_pulls_in_no_heavy_dependencies() -> None:
    code = (
        "import json, sys, convserve.store.directory\n"
        "heavy = {'torch', 'numpy', 'onnxruntime', 'onnx'}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
