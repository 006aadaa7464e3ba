"""A job's checkpoint and TensorBoard files on an S3 store (a real SeaweedFS, tests/s3.py): saved
under jobs/<id>/ after every epoch, read by TensorBoard's own S3 reader, and brought back into an
empty run directory, where the next attempt resumes from them (a trainer on another machine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from convserve.contracts.gate_policy import GatePolicy
from convserve.contracts.spec import TrainConfig
from convserve.store.job_dir import checkpoint_path
from convserve.store.location import location_of, open_store
from tests.conftest import SMALL_SYNTHETIC

pytestmark = pytest.mark.slow


def test_a_jobs_files_reach_the_store_and_tensorboard_reads_them(s3_url, tmp_path: Path,
                                                                 monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from convserve.training.pipeline import Publication, run
    from convserve.training.progress import ProgressReporter
    from convserve.training.train import load_checkpoint

    store = open_store(location_of(s3_url.url, work_dir=tmp_path / "trainer-a"))
    run_dir = store.work.job_dir("job-1", create=True)
    config = TrainConfig(dataset=SMALL_SYNTHETIC, epochs=2, seed=3, compile="off")
    reporter = ProgressReporter(run_dir / "events.jsonl")
    publication = Publication(store, GatePolicy(min_accuracy=0.0), actor="job:job-1",
                              job_id="job-1")
    outcome = run(config, run_dir, reporter, publication=publication)
    reporter.close()
    assert outcome is not None and outcome.published is not None

    names = [item["Key"] for item in s3_url.client().list_objects_v2(
        Bucket=s3_url.bucket, Prefix=f"{s3_url.prefix}/jobs/job-1/")["Contents"]]
    assert f"{s3_url.prefix}/jobs/job-1/checkpoints/last.pt" in names
    assert any("/tensorboard/" in name and "tfevents" in name for name in names)

    # What a user runs: `S3_ENDPOINT=... tensorboard --logdir s3://bucket/prefix/jobs/<id>/tensorboard`
    monkeypatch.setenv("S3_ENDPOINT", s3_url.endpoint_url)
    board = EventAccumulator(f"s3://{s3_url.bucket}/{s3_url.prefix}/jobs/job-1/tensorboard")
    board.Reload()
    tags = board.Tags()["scalars"]
    assert "Accuracy/val" in tags
    assert [event.step for event in board.Scalars("Accuracy/val")] == [1, 2]

    # Trainer B: another work directory, nothing on its disk; the files come back and resume.
    other = open_store(location_of(s3_url.url, work_dir=tmp_path / "trainer-b"))
    fresh = other.work.job_dir("job-1", create=True)
    assert not checkpoint_path(fresh).exists()
    other.restore_job_files("job-1", fresh)
    assert checkpoint_path(fresh).read_bytes() == checkpoint_path(run_dir).read_bytes()
    assert load_checkpoint(fresh, config)["epoch"] == 2
    assert sorted(os.listdir(fresh / "tensorboard")) == sorted(os.listdir(run_dir / "tensorboard"))
