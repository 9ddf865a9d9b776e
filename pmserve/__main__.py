"""`python -m pmserve ...` (and `torchrun -m pmserve ...`) runs the command line."""

import sys

from pmserve.cli.main import main

sys.exit(main())
