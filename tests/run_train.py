"""`sftkit train CONFIG` in a child process, with test-only pauses so a test can kill it at a chosen moment.

    python tests/run_train.py CONFIG.yaml [--key value ...]

Environment (both optional; neither changes the numbers the run computes):
    SFTKIT_TEST_STEP_DELAY=SECONDS   sleep after each step's forward/backward, when dropout has
                                     already drawn from the RNG but the optimizer has not stepped;
                                     with SFTKIT_TEST_STEP_MARKER=FILE, the 1-based number of the
                                     step being delayed is written to FILE as the sleep starts
    SFTKIT_TEST_HANG_IN_SAVE=STEP    hang after the weights of checkpoint-STEP are written into
                                     .tmp-checkpoint-STEP/, before the optimizer and the manifest
"""

from __future__ import annotations

import os
import signal
import sys
import time

import sftkit.train.checkpoint as ckpt
import sftkit.train.step as step_module
from sftkit.cli import app

step_delay = float(os.environ.get("SFTKIT_TEST_STEP_DELAY", "0"))
step_marker = os.environ.get("SFTKIT_TEST_STEP_MARKER")
hang_in_save = os.environ.get("SFTKIT_TEST_HANG_IN_SAVE")

if step_delay:
    accumulate_gradients = step_module.accumulate_gradients
    steps_begun = 0

    def slow_accumulate_gradients(*args, **kwargs):
        global steps_begun
        loss_sum = accumulate_gradients(*args, **kwargs)
        steps_begun += 1
        if step_marker:
            with open(step_marker, "w") as handle:
                handle.write(str(steps_begun))
        time.sleep(step_delay)
        return loss_sum

    step_module.accumulate_gradients = slow_accumulate_gradients

if hang_in_save:
    write_weights = ckpt.write_weights

    def write_weights_then_hang(model, directory, finetuning):
        write_weights(model, directory, finetuning)
        if directory.name == f".tmp-checkpoint-{hang_in_save}":
            time.sleep(3600)

    ckpt.write_weights = write_weights_then_hang

if __name__ == "__main__":
    # A shell that starts this in the background ignores SIGINT for it; the tests send one on purpose.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    app(["train", *sys.argv[1:]], prog_name="sftkit")
