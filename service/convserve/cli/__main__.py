"""`python -m convserve.cli`."""

import sys

from convserve.cli.main import main

sys.exit(main())
