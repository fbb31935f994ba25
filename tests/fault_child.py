"""``python tests/fault_child.py SIGNAL WHERE N run RECIPE ...``: the alignkit CLI that sends itself SIGNAL (KILL,
INT or TERM) at a chosen point, for the fault-injection tests. WHERE is ``step`` (the end of optimizer step N
of any TRL trainer, before that step's checkpoint would be saved), ``save`` (right after checkpoint N is
written) or ``shard`` (right after the N-th data shard is written). Test code only: the product has no hooks."""

import os
import signal
import sys
import time

from transformers import Trainer, TrainerCallback

from alignkit.core import shards
from alignkit.cli import main

SIGNAL, WHERE, N = getattr(signal, f"SIG{sys.argv[1]}"), sys.argv[2], int(sys.argv[3])


def fire() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), SIGNAL)
    time.sleep(30)  # the handler runs here (another thread may have taken the signal): nothing happens meanwhile


class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if WHERE == "step" and state.global_step == N:
            fire()

    def on_save(self, args, state, control, **kwargs):
        if WHERE == "save" and state.global_step == N:
            fire()


if WHERE in ("step", "save"):
    real_init = Trainer.__init__

    def init_with_fault(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.add_callback(Fault())

    Trainer.__init__ = init_with_fault
else:
    real_write, written = shards.write, []

    def write_then_fault(*args, **kwargs):
        real_write(*args, **kwargs)
        written.append(1)
        if len(written) == N:
            fire()

    shards.write = write_then_fault

sys.exit(main(sys.argv[4:]))
