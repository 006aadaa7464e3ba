"""`python -m convserve.training`: train, export and check one model from the command line."""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from convserve.contracts.commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, OneLineParser
from convserve.contracts.gate_policy import GateConfigError, GatePolicy
from convserve.contracts.job_dir import EVENTS_FILE, JobState, Phase
from convserve.contracts.spec import (
    AUGMENT_MODES,
    COMPILE_MODES,
    LOADERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    TrainConfig,
)
from convserve.lifecycle import die_with_parent
from convserve.store import ModelStore, StoreError
from convserve.training.data import DATASET_NAMES_HELP, DatasetError
from convserve.training.errors import ExportError, ResumeError
from convserve.training.progress import ProgressReporter

if TYPE_CHECKING:
    from convserve.training.pipeline import RunOutcome



def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = OneLineParser(prog="python -m convserve.training",
                           description="Train the documented ConvNet, export it to ONNX and check "
                                       "the export against torch.")
    parser.add_argument("--dataset", default=defaults.dataset, help=DATASET_NAMES_HELP)
    parser.add_argument("--datasets-root", default=defaults.datasets_root,
                        help="folder that dataset names resolve in (default: %(default)s)")
    parser.add_argument("--download", action="store_true",
                        help="allow downloading a missing public dataset (cifar10)")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="validation share where a dataset has no split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--compile", choices=("auto", "on", "off"), default=defaults.compile,
                        help="torch.compile the model: auto = on CUDA only (default)")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES, default=defaults.compile_mode)
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--loader", choices=LOADERS, default=defaults.loader,
                        help="where batches come from: the split on the device, or a DataLoader "
                             "with workers and pinned memory (auto: the DataLoader only when the "
                             "split does not fit in half the free GPU memory)")
    parser.add_argument("--loader-workers", type=int, default=defaults.loader_workers,
                        help="DataLoader worker processes (default: %(default)s)")
    recipe = parser.add_argument_group(
        "recipe (the tutorial's: --augment none --schedule constant --label-smoothing 0 "
        "--weight-decay 0)")
    recipe.add_argument("--augment", choices=AUGMENT_MODES, default=defaults.augment,
                        help="on-device augmentation (default: %(default)s; flip suits natural "
                             "images, not digits)")
    recipe.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                        help="per-step learning-rate schedule, peak --lr (default: %(default)s)")
    recipe.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing,
                        help="(default: %(default)s)")
    recipe.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="decoupled (AdamW) when > 0 (default: %(default)s)")
    recipe.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<UTC time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    parser.add_argument("--progress-interval-s", type=float, default=1.0,
                        help="at most one progress event per this many seconds (0: every step)")
    store = parser.add_argument_group("model store and gate (see README: 'Model store and gate')")
    store.add_argument("--store", type=Path, default=None,
                       help="gate the candidate and publish it to this model store if promoted")
    gate_defaults = GatePolicy()
    store.add_argument("--min-accuracy", type=float, default=gate_defaults.min_accuracy,
                       help="lowest validation accuracy a candidate may have (default: %(default)s)")
    store.add_argument("--min-improvement", type=float, default=gate_defaults.min_improvement,
                       help="accuracy the candidate must gain over the champion (default: "
                            "%(default)s: never promote a regression)")
    store.add_argument("--max-class-recall-drop", type=float, default=None,
                       help="refuse a candidate whose recall of any class falls more than this "
                            "below the champion's (default: not checked)")
    store.add_argument("--allow-class-change", action="store_true",
                       help="let a candidate with other classes than the champion replace it")
    store.add_argument("--job-id", default=None,
                       help="the service job this run is (recorded in the card and history)")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, datasets_root=args.datasets_root,
                       download=args.download, val_fraction=args.val_fraction, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       compile=args.compile, compile_mode=args.compile_mode, device=args.device,
                       augment=args.augment, schedule=args.schedule,
                       label_smoothing=args.label_smoothing, weight_decay=args.weight_decay,
                       precision=args.precision, loader=args.loader,
                       loader_workers=args.loader_workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        config = config_from_args(args)
        policy = GatePolicy(min_accuracy=args.min_accuracy, min_improvement=args.min_improvement,
                            max_class_recall_drop=args.max_class_recall_drop,
                            allow_class_change=args.allow_class_change)
    except (ConfigError, GateConfigError) as error:
        parser.error(str(error))
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the run directory to continue")
    if not 0 <= args.progress_interval_s <= 60:
        parser.error(f"--progress-interval-s: expected 0..60, got {args.progress_interval_s}")
    run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: events and exit code say so
    # Imported here so that `--help` and argument errors answer without loading torch.
    from convserve.training import distributed
    from convserve.training.pipeline import Publication, run, summary
    from convserve.training.train import resolve_device

    try:
        world = distributed.from_environment()
    except ValueError as error:
        parser.error(str(error))

    publication = None
    if args.store is not None:
        actor = f"job:{args.job_id}" if args.job_id else f"cli:{_user()}"
        publication = Publication(ModelStore(args.store), policy, actor=actor, job_id=args.job_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Under torchrun only rank 0 reports; the other ranks train their shard and exit.
    reporter = ProgressReporter(run_dir / EVENTS_FILE if world.is_main else None,
                                min_interval_s=args.progress_interval_s)
    try:
        # A job's child dies with its replica (SIGTERM: recorded INTERRUPTED, resumable); a
        # replica restarted on the store then finds the job's true outcome (JobRunner.recover).
        die_with_parent()
        distributed.start(world, resolve_device(config.device))
        outcome = run(config, run_dir, reporter, resume=args.resume, publication=publication,
                      world=world)
    except (DatasetError, ConfigError, ResumeError) as error:
        return _fail(reporter, EXIT_USAGE, str(error))
    except (ExportError, StoreError) as error:
        return _fail(reporter, EXIT_FAILED, str(error))
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a server stopping): the last epoch's
        # checkpoint stays; the job runner records the job INTERRUPTED and can resume it.
        return _fail(reporter, EXIT_INTERRUPTED, "interrupted; resume with --resume --out " + str(run_dir),
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
