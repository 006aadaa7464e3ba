"""Fixtures of the job runner's tests: replicas (JobRunners) on the test's stores, and the job
store parametrised over both backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from convserve.jobs import JobRunner, RunnerConfig
from convserve.store.directory import DirectoryStore


@pytest.fixture(params=["files", "postgresql"])
def jobs_url(request: pytest.FixtureRequest) -> str:
    """"" for the files store, or a fresh database's URL on the tests' real PostgreSQL."""
    return "" if request.param == "files" else request.getfixturevalue("postgres_url")


@pytest.fixture
def replica_factory(store_dir: Path) -> Iterator[Callable[..., JobRunner]]:
    """replica_factory("trainer-a", jobs_url=..., **settings) -> a JobRunner on the test's model
    store; each is closed (its connection pool too) when the test ends."""
    made: list[JobRunner] = []

    def make(replica_id: str = "replica-a", **settings: Any) -> JobRunner:
        config = RunnerConfig(**{"datasets_root": store_dir.parent / "datasets",
                                 "replica_id": replica_id, **settings})
        made.append(JobRunner(DirectoryStore(store_dir), config))
        return made[-1]

    yield make
    for runner in made:
        runner.close()
