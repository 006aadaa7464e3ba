"""One job's training process (convserve.jobs.child): the command and spec.json it gets, its
environment, reading its events, and how its end is recorded. The child here is a stand-in
script given as `RunnerConfig.python` (it receives the real command line: `-m
convserve.training --job DIR`), so each test runs in well under a second; real children are
tests/jobs/test_runner.py's."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from convserve.contracts.gate_policy import GateBounds, GatePolicy
from convserve.contracts.job_state import JobState
from convserve.contracts.model_card import GateDecision
from convserve.jobs import JobRecord, JobRunner, RunnerConfig, TrainParams
from convserve.jobs.child import ChildEvents, first_of, gate_policy_of
from convserve.lifecycle import PARENT_PID_ENV
from convserve.store.job_dir import EVENTS_FILE, EventTail, read_events
from convserve.store.job_spec import read_job_spec
from tests.waits import wait_until


def _stub(folder: Path, body: str) -> str:
    """A stand-in interpreter: a shell script; `$job` is the job directory (the one absolute
    path among its arguments)."""
    script = folder / f"stub-{abs(hash(body))}"
    script.write_text('#!/bin/sh\nfor arg; do case "$arg" in /*) job="$arg";; esac; done\n'
                      f"{body}\n")
    script.chmod(0o755)
    return str(script)


def _event(**fields: Any) -> str:
    """A shell line appending one event to the job's events.jsonl, as the child does."""
    return f"printf '%s\\n' '{json.dumps(fields)}' >> \"$job/{EVENTS_FILE}\""


@pytest.fixture
def runners(replica_factory: Callable[..., JobRunner]) -> Callable[..., JobRunner]:
    def make(replica_id: str = "trainer-a", **settings: Any) -> JobRunner:
        fast = {"heartbeat_s": 0.1, "cancel_grace_s": 5.0, "poll_s": 0.05}
        return replica_factory(replica_id, **{**fast, **settings})

    return make


def _claimed(runner: JobRunner, **settings: Any) -> JobRecord:
    runner.submit(TrainParams.of(**settings))
    record = runner.claim_next()
    assert record is not None
    return record


def _run(runner: JobRunner, record: JobRecord, *, stopped: bool = False) -> JobRecord:
    """Run the claimed job's child to its end; the job's record afterwards."""

    async def main() -> None:
        stop = asyncio.Event()
        if stopped:
            stop.set()
        await asyncio.wait_for(runner.child.run(record, stop, asyncio.Event()), 60)

    asyncio.run(main())
    return runner.get(record.id)


def _states(runner: JobRunner, job_id: str) -> list[str]:
    return [e["state"] for e in read_events(runner.models.work.job_dir(job_id) / EVENTS_FILE)
            if e["type"] == "state"]


# --- the command, spec.json and environment ----------------------------------------------------


def test_command_writes_the_spec_with_the_servers_settings_and_resumes_from_a_checkpoint(
        runners) -> None:
    runner = runners(compile="off", progress_interval_s=0.25)
    record = _claimed(runner, epochs=4, gate={"min_accuracy": 0.8})
    job_dir = runner.models.work.job_dir(record.id)
    command = runner.child.command(record)
    assert command == [runner.config.python, "-m", "convserve.training", "--job", str(job_dir)]
    spec = read_job_spec(job_dir)
    assert (spec.job_id, spec.attempt, spec.store) == (record.id, 1, runner.models.location)
    assert spec.config.epochs == 4 and spec.config.compile == "off"
    assert spec.config.datasets_root == str(runner.config.datasets_root)
    assert spec.progress_interval_s == 0.25 and spec.gate == GatePolicy(min_accuracy=0.8)
    (job_dir / "checkpoints").mkdir()
    (job_dir / "checkpoints" / "last.pt").write_bytes(b"x")
    assert runner.child.command(record)[-1] == "--resume"


def test_several_processes_run_under_torchrun(runners) -> None:
    runner = runners(processes=2)
    record = _claimed(runner, batch_size=64)
    command = runner.child.command(record)
    assert command[:7] == [runner.config.python, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m"]
    assert command[7:] == ["convserve.training", "--job", str(runner.models.work.job_dir(record.id))]


def test_gate_policy_of_prefers_the_stored_policy_over_this_servers(runners) -> None:
    config = RunnerConfig(datasets_root=Path("."), gate_defaults=GatePolicy(min_accuracy=0.9),
                          gate_bounds=GateBounds(min_accuracy_floor=0.2))
    record = _claimed(runners(), gate={"min_improvement": 0.05})
    stored = gate_policy_of(record, config)
    assert stored == GatePolicy(min_accuracy=0.5, min_improvement=0.05)  # resolved at submit
    record.gate_policy = None  # a record from before the policy was stored
    assert gate_policy_of(record, config) == GatePolicy(min_accuracy=0.9, min_improvement=0.05)


@pytest.mark.parametrize(("jobs_url", "processes", "expected_url"), [
    ("", 1, "files"), ("files", 1, "files"), ("", 2, "files")])
def test_the_child_environment_names_the_job_store_and_its_parent(
        runners, store_dir: Path, jobs_url: str, processes: int, expected_url: str) -> None:
    stub = _stub(store_dir.parent, f'env > "$job/env.txt"\n{_event(type="state", state="x")}')
    runner = runners(python=stub, jobs_url=jobs_url, processes=processes,
                     child_env={"EXTRA_SETTING": "42"})
    record = _run(runner, _claimed(runner, batch_size=64))
    lines = (runner.models.work.job_dir(record.id) / "env.txt").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert env["CONVSERVE_JOBS_URL"] == expected_url and env["EXTRA_SETTING"] == "42"
    # One process: the child dies with this replica. Under torchrun the ranks' parent is torchrun.
    assert env.get(PARENT_PID_ENV) == (str(os.getpid()) if processes == 1 else None)


# --- how the child's end is recorded -----------------------------------------------------------


def test_a_child_killed_by_a_signal_fails_the_job_naming_it_with_its_last_lines(
        runners, store_dir: Path) -> None:
    stub = _stub(store_dir.parent, f'{_event(type="epoch", epoch=1, val_accuracy=0.25)}\n'
                                   'echo "last words" >&2\nkill -SEGV $$')
    runner = runners(python=stub)
    record = _run(runner, _claimed(runner))
    assert record.state == JobState.FAILED and record.finished_at and record.pid
    assert record.error.splitlines()[-2:] == [
        "last words", "training process exited with code -11 (killed by SIGSEGV)"]
    assert (record.epoch, record.val_accuracy) == (1, 0.25)  # its last epoch, read at the end
    assert [(a.number, a.outcome) for a in record.attempts] == [(1, "FAILED")]
    assert _states(runner, record.id) == ["QUEUED", "RUNNING", "FAILED"]  # the runner's event


def test_a_child_that_failed_cleanly_keeps_its_own_failed_event(runners, store_dir: Path
                                                                ) -> None:
    stub = _stub(store_dir.parent, f'{_event(type="state", state="FAILED")}\n'
                                   'echo "error: no such dataset" >&2\nexit 2')
    runner = runners(python=stub)
    record = _run(runner, _claimed(runner))
    assert record.state == JobState.FAILED and record.error == "error: no such dataset"
    assert _states(runner, record.id) == ["QUEUED", "RUNNING", "FAILED"]  # not doubled


def test_a_silent_failure_says_its_exit_code(runners, store_dir: Path) -> None:
    runner = runners(python=_stub(store_dir.parent, "exit 3"))
    record = _run(runner, _claimed(runner))
    assert record.error == "training process exited with code 3"


def test_exit_0_without_a_final_state_is_a_failure(runners, store_dir: Path) -> None:
    stub = _stub(store_dir.parent, _event(type="state", state="TRAINING"))
    runner = runners(python=stub)
    record = _run(runner, _claimed(runner))
    assert record.state == JobState.FAILED
    assert "exited with code 0 but its last state was 'TRAINING'" in record.error


def test_a_rejection_the_child_wrote_is_adopted_with_its_cards_gate(runners, store_dir: Path
                                                                    ) -> None:
    gate = GateDecision(False, ("accuracy 0.2 is below min_accuracy 0.5",),
                        candidate_accuracy=0.2, required_accuracy=0.5, parity_passed=True)
    card = json.dumps({"gate": gate.to_dict(), "version": None})
    stub = _stub(store_dir.parent, f"printf '%s' '{card}' > \"$job/card.json\"\n"
                                   f'{_event(type="state", state="REJECTED")}')
    runner = runners(python=stub)
    record = _run(runner, _claimed(runner))
    assert record.state == JobState.REJECTED and record.error == ""
    assert record.gate == gate and record.model_version is None
    assert _states(runner, record.id) == ["QUEUED", "RUNNING", "REJECTED"]


def test_a_child_that_stopped_itself_goes_back_to_the_queue(runners, store_dir: Path) -> None:
    stub = _stub(store_dir.parent, f'{_event(type="state", state="STOPPED")}\nexit 1')
    runner = runners(python=stub)
    record = _run(runner, _claimed(runner))
    assert record.state == JobState.QUEUED and record.pid is None
    assert [(a.number, a.outcome) for a in record.attempts] == [(1, "released")]
    assert runner.queue_positions() == {record.id: 1}


def test_a_trainer_stopping_as_it_claims_releases_the_job_without_a_child(
        runners, store_dir: Path) -> None:
    runner = runners(python=_stub(store_dir.parent, 'touch "$job/started"'))
    record = _run(runner, _claimed(runner), stopped=True)
    assert record.state == JobState.QUEUED and record.lost_attempts == 0
    assert not (runner.models.work.job_dir(record.id) / "started").exists()


def test_an_attempt_that_lost_its_claim_stops_its_child_and_records_nothing(
        runners, store_dir: Path) -> None:
    stub = _stub(store_dir.parent, "while :; do sleep 0.05; done")  # stops only when told
    old, new = runners("trainer-a", python=stub), runners("trainer-b")
    stale = _claimed(old)
    with new.jobs.locked(stale.id) as transaction:  # trainer-a was declared dead meanwhile
        transaction.record.end_attempt("lost", "then")
        transaction.record.state = JobState.QUEUED
        transaction.save()
    taken = new.claim_next()
    assert taken is not None and taken.attempt == 2
    record = _run(old, stale)  # returns only once its child was stopped
    wait_until(lambda: _group_gone(stale.pid), "the stale attempt's child to be gone")
    assert record.state == JobState.RUNNING and record.trainer == "trainer-b"
    assert record.attempt == 2 and record.attempts[-1].outcome == "" and not record.error


def test_a_cancel_request_stops_the_child_at_its_next_heartbeat(runners, store_dir: Path
                                                                ) -> None:
    stub = _stub(store_dir.parent, 'touch "$job/started"\nwhile :; do sleep 0.05; done')
    runner = runners(python=stub)
    record = _claimed(runner)
    started = runner.models.work.job_dir(record.id) / "started"

    async def main() -> None:
        run = asyncio.create_task(runner.child.run(record, asyncio.Event(), asyncio.Event()))
        while not started.exists():  # the child is up
            await asyncio.sleep(0.02)
        await asyncio.to_thread(runner.jobs.request_cancel, record.id)
        await asyncio.wait_for(run, 30)

    asyncio.run(main())
    done = runner.get(record.id)
    assert done.state == JobState.CANCELLED and done.attempts[-1].outcome == "CANCELLED"
    wait_until(lambda: _group_gone(done.pid), "the child's process group to be gone")


def _group_gone(pgid: int) -> bool:
    """No process left in the group (an orphaned `sleep` is reaped by init a moment later)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


# --- the child's events, and first_of ----------------------------------------------------------


def test_child_events_keeps_the_latest_numbers_and_skips_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    lines = [{"type": "state", "state": "TRAINING"}, {"type": "progress", "images_per_s": 120.5},
             {"type": "epoch", "epoch": 1, "val_accuracy": 0.4},
             {"type": "epoch", "epoch": "two"},           # malformed: ignored, not fatal
             {"type": "progress"},                        # missing its field: ignored
             {"type": "epoch", "epoch": 2, "val_accuracy": 0.6}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines)
                    + '{"type": "state", "sta\n'         # torn by a kill mid-write
                    + '[1, 2]\n'                         # not an object
                    + '{"type": "state", "state": "EXPORTING"}\n'
                    + '{"type": "state", "state": "GAT')  # still being written
    events = ChildEvents(EventTail(path), forward=True)
    events.read()
    assert (events.epoch, events.val_accuracy, events.images_per_s) == (2, 0.6, 120.5)
    assert events.last_state == "EXPORTING"
    assert len(events.pending) == 7  # every readable object, to copy into a job store
    with path.open("a") as handle:
        handle.write('ING"}\n')
    events.read()
    assert events.last_state == "GATING" and events.pending[-1]["state"] == "GATING"


def test_child_events_without_forwarding_keeps_nothing_pending(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    path.write_text('{"type": "epoch", "epoch": 3, "val_accuracy": 0.9}\n')
    events = ChildEvents(EventTail(path), forward=False)
    events.read()
    assert events.epoch == 3 and events.pending == []
    nothing = ChildEvents(None, forward=False)
    nothing.read()
    assert nothing.epoch is None and nothing.last_state is None


def test_first_of_returns_on_the_first_and_cancels_the_rest() -> None:
    async def main() -> tuple[bool, bool]:
        done, never = asyncio.Event(), asyncio.Event()
        waiting = asyncio.ensure_future(never.wait())
        done.set()
        await asyncio.wait_for(first_of(60, done.wait(), waiting), 10)
        await asyncio.sleep(0)  # let the cancellation land
        return waiting.cancelled(), never.is_set()

    assert asyncio.run(main()) == (True, False)


def test_first_of_returns_after_its_timeout_when_nothing_finishes() -> None:
    async def main() -> None:
        await asyncio.wait_for(first_of(0.01, asyncio.Event().wait()), 10)

    asyncio.run(main())

