"""What every convserve command line shares: one exit-code table and one-line usage errors.

The job runner reads a training process's exit code with the same table (convserve.jobs), so it is
a contract, not a detail of one CLI. Standard library only.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_OK = 0
EXIT_FAILED = 1          # the command ran and failed: a server error, a failed export, ...
EXIT_USAGE = 2           # bad input: arguments, configuration, a dataset that does not exist
EXIT_INTERRUPTED = 130   # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")
