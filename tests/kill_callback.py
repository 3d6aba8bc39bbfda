"""A callback that SIGKILLs its own process at a given optimiser step (for the resume test)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
