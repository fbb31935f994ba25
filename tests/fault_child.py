"""``python tests/fault_child.py SIGNAL WHERE N run RECIPE ...``: the alignkit CLI that sends itself SIGNAL (KILL,
INT or TERM) at a chosen point, for the fault-injection tests. WHERE is

- ``step``: the end of optimizer step N, before that step's checkpoint would be saved (any transformers/TRL
  ``Trainer``: its ``on_step_end``; the ppo stage's own loop: right after ``alignkit.ppo.ppo_step`` returns for
  step N, before the scheduler steps and the checkpoint is written);
- ``save``: right after checkpoint N is written (a Trainer's ``on_save``; ppo: ``alignkit.ppo.checkpoint.save_checkpoint``
  for step N has returned);
- ``shard``: right after the N-th data shard is written through ``alignkit.core.shards.write``.

SIGNAL ``NONE`` sends nothing: the plain CLI, but, as with every signal, each start of training is reported on
stdout as ``[fault_child] resume_from=<checkpoint folder name or None>`` (a Trainer's ``resume_from_checkpoint``;
ppo: the checkpoint ``load_checkpoint`` restores), so a test can check that a rerun resumed where it should.
Test code only: the product has no hooks.
"""

import os
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

import alignkit.ppo
from alignkit.cli import main
from alignkit.core import shards
from alignkit.ppo import checkpoint as ppo_checkpoint

SIGNAL = None if sys.argv[1] == "NONE" else getattr(signal, f"SIG{sys.argv[1]}")
WHERE, N = sys.argv[2], int(sys.argv[3])
# A process started in the background by a script inherits SIGINT as ignored (the shell's rule for background
# jobs), and Python then installs no KeyboardInterrupt handler: restore it, so that the INT trials are a Ctrl-C
# wherever the tests run (CI runners and `nohup ... &` included).
signal.signal(signal.SIGINT, signal.default_int_handler)


def fire() -> None:
    if SIGNAL is None:
        return
    sys.stdout.flush()
    os.kill(os.getpid(), SIGNAL)
    time.sleep(30)  # the handler runs here (another thread may have taken the signal): nothing happens meanwhile


def report_resume(checkpoint) -> None:
    print(f"[fault_child] resume_from={Path(checkpoint).name if checkpoint else None}", flush=True)


class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if WHERE == "step" and state.global_step == N:
            fire()

    def on_save(self, args, state, control, **kwargs):
        if WHERE == "save" and state.global_step == N:
            fire()


# --- transformers / TRL trainers
real_init, real_train = Trainer.__init__, Trainer.train


def init_with_fault(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    self.add_callback(Fault())


def train_reporting_resume(self, resume_from_checkpoint=None, *args, **kwargs):
    report_resume(resume_from_checkpoint)
    return real_train(self, resume_from_checkpoint, *args, **kwargs)


Trainer.__init__, Trainer.train = init_with_fault, train_reporting_resume

# --- the ppo stage's own loop (alignkit/stages/ppo.py imports these names from their modules when it runs)
real_ppo_step, real_save, real_latest = alignkit.ppo.ppo_step, ppo_checkpoint.save_checkpoint, \
    ppo_checkpoint.latest_checkpoint


def ppo_step_then_fault(step, *args, **kwargs):
    out = real_ppo_step(step, *args, **kwargs)
    if WHERE == "step" and step + 1 == N:
        fire()
    return out


def save_then_fault(run_dir, step, *args, **kwargs):
    out = real_save(run_dir, step, *args, **kwargs)
    if WHERE == "save" and step == N:
        fire()
    return out


def latest_reporting_resume(run_dir):
    found = real_latest(run_dir)
    report_resume(found)
    return found


alignkit.ppo.ppo_step = ppo_step_then_fault
ppo_checkpoint.save_checkpoint, ppo_checkpoint.latest_checkpoint = save_then_fault, latest_reporting_resume

# --- data shards (label, cai-label, cai-revise, eval samples and scores, on-policy dpo pairs)
real_write, written = shards.write, []


def write_then_fault(*args, **kwargs):
    real_write(*args, **kwargs)
    written.append(1)
    if WHERE == "shard" and len(written) == N:
        fire()


shards.write = write_then_fault

sys.exit(main(sys.argv[4:]))
