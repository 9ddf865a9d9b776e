"""`python -m pmserve ...` (and `torchrun -m pmserve ...`) runs the command line."""

import os
import sys

# `-m` puts the working directory first on sys.path. Run from a checkout of pmserve, that makes its top-level
# kernels/ folder (pmserve.kernels) the module `kernels` and hides Hugging Face's `kernels`, which transformers
# imports; so drop it, as Python's -P does. pmserve itself is imported by now.
if sys.path and sys.path[0] == os.getcwd() and not getattr(sys.flags, "safe_path", False):
    del sys.path[0]

from pmserve.cli.main import main  # noqa: E402

sys.exit(main())
