"""`python -m training`: train, export and check one model from the command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from training.config import COMPILE_MODES, ConfigError, TrainConfig
from training.data import DATASET_NAMES_HELP, DatasetError
from training.export import ExportError
from training.progress import ProgressReporter
from training.train import ResumeError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = OneLineParser(prog="python -m training",
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
    parser.add_argument("--out", type=Path, default=None,
                        help="run directory (default: runs/<UTC time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last checkpoint")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, datasets_root=args.datasets_root,
                       download=args.download, val_fraction=args.val_fraction, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       compile=args.compile, compile_mode=args.compile_mode, device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        config = config_from_args(args)
    except ConfigError as error:
        parser.error(str(error))
    if args.resume and args.out is None:
        parser.error("--resume needs --out, the run directory to continue")
    run_dir = args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    # Imported here so that `--help` and argument errors answer without loading torch.
    from training.pipeline import run, summary

    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = ProgressReporter(run_dir / "events.jsonl")
    try:
        outcome = run(config, run_dir, reporter, resume=args.resume)
    except (DatasetError, ConfigError, ResumeError) as error:
        return _fail(reporter, EXIT_BAD_INPUT, str(error))
    except ExportError as error:
        return _fail(reporter, EXIT_FAILED, str(error))
    except KeyboardInterrupt:
        return _fail(reporter, 130, "interrupted; resume with --resume --out " + str(run_dir))
    reporter.event("state", state="SUCCEEDED", model=str(outcome.model_path))
    reporter.close()
    print(summary(outcome, started))
    return 0


def _fail(reporter: ProgressReporter, code: int, message: str) -> int:
    reporter.event("state", state="FAILED", error=message)
    reporter.close()
    print(f"python -m training: error: {message}", file=sys.stderr)
    return code
