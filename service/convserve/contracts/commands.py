"""What every convserve command line shares: one exit-code table and one-line usage errors.

The job runner reads a training process's exit code with the same table (convserve.jobs), so it is
a contract, not a detail of one CLI. Standard library only.
"""

from __future__ import annotations

import argparse
from importlib import metadata
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILED = 1          # the command ran and failed: a server error, a failed export, a FAILED job
EXIT_USAGE = 2           # bad input: arguments, configuration, a dataset that does not exist
EXIT_REJECTED = 3        # `train --watch`, `watch`: the job trained, and the gate rejected it
EXIT_CANCELLED = 4       # ... the job was cancelled
EXIT_JOB_INTERRUPTED = 5  # ... the job stopped with its server; `convserve resume JOB` continues it
EXIT_INTERRUPTED = 130   # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)

# How a followed job's final state becomes the command's exit code (scripts can branch on it).
EXIT_OF_JOB_STATE = {"PROMOTED": EXIT_OK, "REJECTED": EXIT_REJECTED, "FAILED": EXIT_FAILED,
                     "CANCELLED": EXIT_CANCELLED, "INTERRUPTED": EXIT_JOB_INTERRUPTED}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def package_version() -> str:
    """The installed distribution's version ("0+unknown" when run from a bare checkout)."""
    try:
        return metadata.version("convserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version",
                        version=f"{parser.prog} {package_version()}",
                        help="print the version and exit")


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    """`-o json`: one JSON document on stdout, for scripts; the default is text for people."""
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text",
                        help="output format (default: text)")
