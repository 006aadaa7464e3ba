"""The model store's contract (convserve.store.base), run against both backends: the directory
store and the S3 store on a real S3-compatible server (SeaweedFS, tests/s3.py). Races and kills
use real processes (tests/store_worker.py); nothing is mocked.

Backend-specific details (the directory's lock and temp dirs, the objects' layout) are tested in
test_directory.py and test_s3.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from convserve.contracts.errors import IntegrityError, StoreError, VersionNotFound
from convserve.contracts.model_card import GateDecision
from convserve.store.base import ModelStore
from convserve.store.location import location_of, open_store
from tests.store.conftest import MODEL_BYTES
from tests.store.test_directory import publish, run_worker, start_workers


@dataclass(frozen=True)
class Place:
    kind: str
    url: str
    work: Path

    def open(self, work: Path | None = None) -> ModelStore:
        """Another handle on the store: another process (this work dir, whose cache it shares),
        or another replica (`work`: a work dir of its own)."""
        return open_store(location_of(self.url, work_dir=work or self.work))


@pytest.fixture(params=["directory", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "directory":
        return Place("directory", str(tmp_path / "store"), tmp_path / "store")
    s3 = request.getfixturevalue("s3_url")  # sets the AWS_* environment workers inherit too
    return Place("s3", s3.url, tmp_path / "work")


@pytest.fixture
def store(place: Place) -> ModelStore:
    return place.open()


def corrupt_model(place: Place, store: ModelStore, version: int) -> None:
    """Replace version's model bytes behind the store's back (same length, other content)."""
    if place.kind == "directory":
        path = Path(place.url) / "models" / str(version) / "model.onnx"
        path.chmod(0o644)
        path.write_bytes(os.urandom(MODEL_BYTES))
    else:
        objects = store.objects  # type: ignore[attr-defined]
        objects.put(f"models/{version}/model.onnx", os.urandom(MODEL_BYTES // 2))


def assert_consistent(store: ModelStore) -> None:
    """Every listed version opens intact; history is a chain that ends at the pointer."""
    for version in store.versions():
        opened = store.open_version(version)
        assert hashlib.sha256(opened.path.read_bytes()).hexdigest() == opened.card.sha256
        assert opened.card.version == version
    history = store.history()
    assert [e.previous for e in history] == [None] + [e.version for e in history[:-1]]
    assert store.promoted_version() == (history[-1].version if history else None)
    assert {e.version for e in history} <= set(store.versions())


# ----------------------------------------------------------------------------- one writer


def test_empty_store(store: ModelStore) -> None:
    assert (store.versions(), store.promoted_version(), store.history()) == ([], None, [])
    with pytest.raises(VersionNotFound):
        store.card(1)


def test_publish_then_read_back(store: ModelStore, place: Place, make_model) -> None:
    model = make_model()
    result = publish(store, model, 0.7, job_id="job-1")
    assert (result.promoted, result.version, result.previous) == (True, 1, None)
    other = place.open()  # another replica sees it all
    assert other.versions() == [1] and other.promoted_version() == 1
    opened = other.open_version(1)
    assert opened.path.read_bytes() == model.read_bytes()
    card = other.card(1)
    assert card["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert (card["version"], card["job_id"], card["gate"]["promoted"]) == (1, "job-1", True)
    assert card["metrics"]["onnx_val_accuracy"] == 0.7 and opened.card.raw == card
    [entry] = other.history()
    assert (entry.version, entry.previous, entry.actor) == (1, None, "job:test")


def test_rejected_candidate_leaves_nothing(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.7)
    result = publish(store, make_model(), 0.6)
    assert (result.promoted, result.version, result.previous) == (False, None, 1)
    assert store.versions() == [1] and len(store.history()) == 1


def test_decide_sees_the_champion_and_numbers_grow(store: ModelStore, make_model) -> None:
    seen: list[int | None] = []

    def decide(champion: int | None) -> GateDecision:
        seen.append(champion)
        return GateDecision(True, ("always",))

    for _ in range(3):
        store.publish(make_model(), {}, decide, actor="job:x")
    assert seen == [None, 1, 2] and store.versions() == [1, 2, 3]
    assert_consistent(store)


def test_promote_rolls_back_and_checks_the_version(store: ModelStore, make_model) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)
    entry = store.promote(1, reason="rollback", actor="operator:me")
    assert (entry.version, entry.previous) == (1, 2) and store.promoted_version() == 1
    assert [e.version for e in store.history()] == [1, 2, 1]
    with pytest.raises(VersionNotFound):
        store.promote(7, reason="nope", actor="operator:me")
    with pytest.raises(StoreError):
        store.promote(1, reason=" ", actor="operator:me")
    assert_consistent(store)


def test_a_corrupted_model_is_refused(store: ModelStore, place: Place, make_model) -> None:
    publish(store, make_model(), 0.5)
    publish(store, make_model(), 0.6)
    store.open_version(1)  # this handle holds a good copy (the S3 store's cache) ...
    corrupt_model(place, store, 1)
    with pytest.raises(IntegrityError):  # ... yet promote checks what replicas will load
        store.promote(1, reason="rollback to a broken version", actor="operator:me")
    fresh = place.open(place.work.parent / "fresh")  # no cached copy: a new replica's download
    with pytest.raises(IntegrityError, match="version 1"):
        fresh.open_version(1)
    with pytest.raises(IntegrityError):
        fresh.promote(1, reason="rollback to a broken version", actor="operator:me")
    assert fresh.promoted_version() == 2 and fresh.open_version(2).card.version == 2


# ----------------------------------------------------------------------------- races


def test_racing_publishers_never_share_a_number_or_skip_a_champion(
        store: ModelStore, place: Place, make_model) -> None:
    accuracies = [0.3, 0.9, 0.5, 0.7, 0.6, 0.8]
    place.work.mkdir(parents=True, exist_ok=True)
    results = start_workers(place.url, [(make_model(), a) for a in accuracies], hold=0.2,
                            scratch=place.work)
    promoted = [r for r in results if r["promoted"]]
    assert len({r["version"] for r in promoted}) == len(promoted)  # no number twice
    for r in promoted:  # each replaced exactly the champion its (last) decision was made against
        assert r["previous"] == r["decision"]["champion_seen"]
        assert store.card(r["version"])["metrics"]["onnx_val_accuracy"] == \
            accuracies[results.index(r)]
    history = store.history()
    accs = [store.card(e.version)["metrics"]["onnx_val_accuracy"] for e in history]
    assert accs == sorted(accs) and len(set(accs)) == len(accs)  # never a worse one promoted
    assert accs[-1] == 0.9
    assert_consistent(store)


def test_racing_promotions_all_land_in_history(store: ModelStore, make_model) -> None:
    for accuracy in (0.5, 0.6, 0.7):
        publish(store, make_model(), accuracy)
    barrier, errors = threading.Barrier(6), []

    def promote(version: int) -> None:
        barrier.wait()
        try:
            store.promote(version, reason=f"pin {version}", actor="operator:race")
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=promote, args=(v,)) for v in (1, 2, 3, 1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    history = store.history()
    assert len(history) == 3 + 6
    assert sorted(e.version for e in history[3:]) == [1, 1, 2, 2, 3, 3]
    assert_consistent(store)


# ----------------------------------------------------------------------------- crashes


# Each backend's own points inside publish (base.crash_point): the directory's mid-copy and before
# its rename, S3's after the model's upload; then both backends' before and after the pointer.
@pytest.mark.parametrize(("place", "point"), [
    ("directory", "copy"), ("directory", "before_rename"), ("s3", "upload"),
    *((kind, point) for kind in ("directory", "s3") for point in ("before_pointer",
                                                                 "before_history")),
], indirect=["place"])
def test_a_publisher_killed_midway_exposes_nothing_half_written(
        store: ModelStore, place: Place, make_model, point: str) -> None:
    publish(store, make_model(), 0.5)
    before = store.versions()
    proc = run_worker(place.url, make_model(), 0.9, "--crash-at", point,
                      "--work-dir", str(place.work / "worker"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    reopened = place.open()
    promoted = reopened.promoted_version()
    assert promoted == (2 if point == "before_history" else 1)
    for version in reopened.versions():
        reopened.open_version(version)  # whatever is listed is whole
    result = publish(reopened, make_model(), 0.95, actor="job:next")
    assert result.promoted and result.previous == promoted
    assert result.version not in before  # a number is never handed out twice
    history = reopened.history()
    assert history[-1].version == result.version and history[-1].previous == promoted
    assert promoted in [e.version for e in history]  # a pointer move is never lost from history
