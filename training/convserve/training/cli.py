"""`python -m convserve.training`: train, export and check one model from the command line."""

from __future__ import annotations

import argparse
import getpass
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.contracts import spec
from convserve.contracts.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_version_flag,
)
from convserve.contracts.errors import (
    ConfigError,
    DatasetError,
    ExportError,
    ResumeError,
    StoreError,
    Unavailable,
)
from convserve.contracts.gate_policy import GatePolicy, add_gate_arguments, gate_policy_of
from convserve.contracts.job_state import JobState, Phase
from convserve.contracts.spec import TrainConfig
from convserve.lifecycle import die_with_parent
from convserve.progress_bar import ProgressDisplay
from convserve.store.base import ModelStore
from convserve.store.job_dir import EVENTS_FILE
from convserve.store.job_spec import read_job_spec
from convserve.store.location import StoreLocation, location_of, open_store
from convserve.training.progress import ProgressReporter

if TYPE_CHECKING:
    from convserve.training.distributed import World
    from convserve.training.pipeline import RunOutcome


FENCE_WAIT_S = 60.0  # how long a finished job waits for an unreachable job store before publishing


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m convserve.training",
                           description="Train the documented ConvNet, export it to ONNX and check "
                                       "the export against torch.")
    add_version_flag(parser)
    spec.add_arguments(parser, spec.SETTINGS, defaults=TrainConfig())
    run = parser.add_argument_group("the run")
    run.add_argument("--out", type=Path, default=None,
                     help="run directory (default: runs/<UTC time>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out (or --job) from its last checkpoint")
    run.add_argument("--progress-interval-s", type=float, default=1.0,
                     help="at most one progress event per this many seconds (0: every step)")
    run.add_argument("--job", type=Path, default=None, metavar="DIR",
                     help="run the service job in DIR: every setting comes from DIR/spec.json, "
                          "which the job runner wrote")
    store = parser.add_argument_group("model store and gate (see README: 'Model store and gate')")
    store.add_argument("--store", default=None, metavar="DIR|s3://BUCKET/PREFIX",
                       help="gate the candidate and publish it to this model store if promoted")
    store.add_argument("--s3-endpoint-url", default="", metavar="URL",
                       help="an S3-compatible server's URL for an s3:// store (default: AWS)")
    add_gate_arguments(store, GatePolicy())
    return parser


@dataclass(frozen=True)
class Invocation:
    """What to run, from the flags or from a job's spec.json."""

    config: TrainConfig
    policy: GatePolicy
    run_dir: Path
    store: StoreLocation | None
    job_id: str | None
    progress_interval_s: float
    attempt: int = 0           # a job's claim: checked before publishing (0: none)


def invocation_of(args: argparse.Namespace) -> Invocation:
    """Raises ConfigError with the spec's message for a value out of range."""
    if args.job is not None:
        job = read_job_spec(args.job)
        return Invocation(job.config, job.gate, args.job, job.store, job.job_id,
                          job.progress_interval_s, job.attempt)
    if args.resume and args.out is None:
        raise ConfigError("--resume needs --out, the run directory to continue")
    if not 0 <= args.progress_interval_s <= 60:
        raise ConfigError(f"--progress-interval-s: expected 0..60, got {args.progress_interval_s}")
    run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Invocation(TrainConfig(**spec.values_from(args, spec.SETTINGS)), gate_policy_of(args),
                      run_dir, location_of(args.store, s3_endpoint_url=args.s3_endpoint_url)
                      if args.store else None, None, args.progress_interval_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        job = invocation_of(args)
    except ConfigError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: events and exit code say so
    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun's; set before torch is imported
    display = ProgressDisplay() if main_rank else None
    if display:  # at once: importing torch and loading data take seconds before any epoch
        display.line(f"training {job.config.dataset} for {job.config.epochs} epochs into "
                     f"{job.run_dir} (loading torch)")
    # Imported here so that `--help` and argument errors answer without loading torch.
    from convserve.training import distributed

    try:
        world = distributed.from_environment()
    except ValueError as error:
        parser.error(str(error))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun only rank 0 reports; the other ranks train their shard and exit.
    reporter = ProgressReporter(job.run_dir / EVENTS_FILE if world.is_main else None,
                                display if world.is_main else None,
                                min_interval_s=job.progress_interval_s)
    return _run(job, args.resume, world, reporter, started)


def _run(job: Invocation, resume: bool, world: World, reporter: ProgressReporter,
         started: float) -> int:
    from convserve.training import distributed
    from convserve.training.pipeline import Publication, run, summary
    from convserve.training.train import resolve_device

    publication = None
    if job.store is not None:
        actor = f"job:{job.job_id}" if job.job_id else f"cli:{_user()}"
        store = open_store(job.store)
        publication = Publication(store, job.policy, actor=actor, job_id=job.job_id,
                                  fence=_fence(job, store) if job.attempt else None)
    try:
        # A job's child dies with its trainer (SIGTERM: STOPPED, its checkpoint kept); another
        # trainer then puts the job back in the queue and resumes it (JobRunner.recover).
        die_with_parent()
        distributed.start(world, resolve_device(job.config.device))
        outcome = run(job.config, job.run_dir, reporter, resume=resume, publication=publication,
                      world=world)
    except (ConfigError, DatasetError, ResumeError) as error:
        return _fail(reporter, EXIT_USAGE, str(error))
    except (ExportError, StoreError) as error:
        return _fail(reporter, EXIT_FAILED, str(error))
    except Unavailable as error:  # the job store, at the fence: not the job's fault
        if job.job_id:  # STOPPED: its trainer puts it back in the queue, to resume and publish
            return _fail(reporter, EXIT_INTERRUPTED, f"{error}; not published: the job goes back "
                         "to the queue and resumes from its checkpoint", state=Phase.STOPPED)
        return _fail(reporter, EXIT_FAILED, str(error))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a trainer stopping): the last epoch's
        # checkpoint stays. A job's run is not over (its trainer requeues it): STOPPED, not the
        # final INTERRUPTED that a run by hand ends with.
        if job.job_id:
            return _fail(reporter, EXIT_INTERRUPTED, "stopped (SIGTERM); the checkpoint of the "
                         "last finished epoch stays for the job's next attempt",
                         state=Phase.STOPPED)
        return _fail(reporter, EXIT_INTERRUPTED,
                     f"interrupted; resume with --resume --out {job.run_dir}",
                     state=JobState.INTERRUPTED)
    finally:
        distributed.stop()
    if outcome is None:  # not rank 0: rank 0 exports, gates and publishes
        reporter.close()
        return EXIT_OK
    reporter.event("state", state=final_state(outcome), model=str(outcome.model_path),
                   version=outcome.published.version if outcome.published else None)
    reporter.close()
    print(summary(outcome, started))
    return EXIT_OK


def _fence(job: Invocation, store: ModelStore) -> Callable[[], None]:
    """Right before publishing, the job store must still say this attempt holds the job: the
    one the runner named in the environment (PostgreSQL), or the store's files. While the job
    store is unreachable it asks again, with backoff, for up to FENCE_WAIT_S; then Unavailable
    (the job goes back to the queue, see `_run`)."""
    from convserve.jobs.backend import JOBS_URL_ENV, opened

    def check() -> None:
        assert job.job_id is not None
        deadline, delay = time.monotonic() + FENCE_WAIT_S, 0.5
        with opened(os.environ.get(JOBS_URL_ENV, ""), store) as jobs:
            while True:
                try:
                    return jobs.fence(job.job_id, job.attempt)
                except Unavailable:
                    if time.monotonic() + delay > deadline:
                        raise
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)

    return check


def final_state(outcome: RunOutcome) -> str:
    """SUCCEEDED without a store; PROMOTED or REJECTED once the gate has decided."""
    if outcome.published is None:
        return Phase.SUCCEEDED
    return JobState.PROMOTED if outcome.published.promoted else JobState.REJECTED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry / no login name inside some containers
        return "unknown"


def _fail(reporter: ProgressReporter, code: int, message: str, state: str = JobState.FAILED) -> int:
    reporter.event("state", state=state, error=message)
    reporter.close()
    print(f"python -m convserve.training: error: {message}", file=sys.stderr)
    return code
