"""Entry point: `python -m convserve.training --dataset digits --epochs 10 --out DIR`."""

import sys

from convserve.training.cli import main

sys.exit(main())
