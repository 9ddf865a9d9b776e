"""After the kernel tests (this file sorts after tests/test_kernel*.py): TRITON_INTERPRET, which they need, was
set only in their child processes, never in this pytest process, and nothing here runs the kernels interpreted."""

import os
import sys

from tests.conftest import TRITON_INTERPRET_AT_START


def test_triton_interpret_never_set_in_this_process():
    now = os.environ.get("TRITON_INTERPRET")  # None: not in os.environ
    assert now == TRITON_INTERPRET_AT_START, (
        f"TRITON_INTERPRET is {now!r} in the main pytest process; it was {TRITON_INTERPRET_AT_START!r} at its start"
    )
    fused = sys.modules.get("pmserve.kernels.fused_lora")
    if fused is not None and TRITON_INTERPRET_AT_START is None:
        assert not fused._INTERPRET, "pmserve.kernels.fused_lora was imported here under the interpreter"
