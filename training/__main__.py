"""Entry point: `python -m training --dataset digits --epochs 10 --out DIR`."""

import sys

from training.cli import main

sys.exit(main())
