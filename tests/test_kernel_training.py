"""FusedPerturbation (PEFT LoRA layers through the fused kernel) under Triton's interpreter, in a child process.

The tests themselves are in tests/interpreted_kernel_training.py; tests/interpreter_subprocess.py says why they run
in a child pytest with TRITON_INTERPRET=1 in its environment only, and what is checked of that run.
"""

from tests.interpreter_subprocess import run_interpreted

TRAINING_TESTS = 10  # tests/interpreted_kernel_training.py's test count


def test_fused_perturbation_in_the_triton_interpreter(tmp_path):
    run_interpreted("tests/interpreted_kernel_training.py", TRAINING_TESTS, tmp_path)
