"""The trainer CLI with rank 1 stalling (a hung GPU, a stuck file system) before some steps:

    STALL="1:12,3:120" python tests/stall_rank.py --job.config_file ... (the trainer's arguments)

sleeps 12 s before step 1 and 120 s before step 3, printing ``stalling before step N at T`` (T: time.time())
to stderr first.
"""

import os
import sys
import time

from titan_dsv4.train import Trainer, main

STALLS = {int(step): float(seconds) for step, seconds in
          (item.split(":") for item in os.environ.get("STALL", "").split(",") if item)}
train_step = Trainer.train_step


def stalling_train_step(self) -> dict:
    seconds = STALLS.get(self.step + 1) if self.rank == 1 else None
    if seconds:
        print(f"stalling before step {self.step + 1} at {time.time()}", file=sys.stderr, flush=True)
        time.sleep(seconds)
    return train_step(self)


Trainer.train_step = stalling_train_step
sys.exit(main(sys.argv[1:]))
