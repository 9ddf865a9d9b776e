"""After the kernel tests (this file sorts after tests/test_kernel*.py): TRITON_INTERPRET, which they need, was
set only in their child processes, never in this pytest process, and nothing here runs the kernels interpreted."""

import os
import sys

from tests.conftest import TRITON_INTERPRET_AT_START


def test_triton_interpret_never_set_in_this_process():
    if TRITON_INTERPRET_AT_START is None:
        assert "TRITON_INTERPRET" not in os.environ
    else:  # set by whoever started pytest: left as it was
        assert os.environ.get("TRITON_INTERPRET") == TRITON_INTERPRET_AT_START
    fused = sys.modules.get("pmserve.kernels.fused_lora")
    if fused is not None and TRITON_INTERPRET_AT_START is None:
        assert not fused._INTERPRET  # imported here (by another test) without the interpreter
