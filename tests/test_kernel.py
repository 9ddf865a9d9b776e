"""The fused LoRA kernels against the PyTorch reference, under Triton's interpreter, in a child process.

The tests themselves are in tests/interpreted_kernel.py; tests/interpreter_subprocess.py says why they run in a
child pytest with TRITON_INTERPRET=1 in its environment only, and what is checked of that run.
"""

from tests.interpreter_subprocess import run_interpreted

KERNEL_TESTS = 53  # tests/interpreted_kernel.py's test count, parametrisations included


def test_kernels_in_the_triton_interpreter(tmp_path):
    run_interpreted("tests/interpreted_kernel.py", KERNEL_TESTS, tmp_path)
