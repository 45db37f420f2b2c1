"""The trainer CLI with one fault injected into its N-th checkpoint save (``FAULT_AT_SAVE``, default 2):

    python tests/checkpoint_faults.py FAULT --job.config_file ... (the trainer's arguments)

FAULT: ``mid-write`` (SIGKILL after every data file is written, before DCP's metadata), ``before-commit``
(SIGKILL just before the rename that completes a checkpoint), ``disk-full`` (the write raises ENOSPC).
"""

import errno
import os
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

import titan_dsv4.components.checkpoint as checkpoint
from titan_dsv4.train import main

FAULT, AT = sys.argv[1], int(os.environ.get("FAULT_AT_SAVE", "2"))
saves = 0


def counting(original):
    def wrapper(*args, **kwargs):
        global saves
        saves += 1
        return original(*args, **kwargs)
    return wrapper


checkpoint.CheckpointManager.save = counting(checkpoint.CheckpointManager.save)

if FAULT == "mid-write":
    finish = FileSystemWriter.finish

    def killed_before_metadata(self, *args, **kwargs):
        if saves == AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return finish(self, *args, **kwargs)

    FileSystemWriter.finish = killed_before_metadata
elif FAULT == "before-commit":
    rename = os.rename

    def killed_before_rename(src, dst):
        if saves == AT and str(src).endswith(".partial"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst)

    checkpoint.os.rename = killed_before_rename
elif FAULT == "disk-full":
    write_data = FileSystemWriter.write_data

    def full_disk(self, *args, **kwargs):
        if saves == AT:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_data(self, *args, **kwargs)

    FileSystemWriter.write_data = full_disk
else:
    raise SystemExit(f"unknown fault {FAULT!r}")

sys.exit(main(sys.argv[2:]))
