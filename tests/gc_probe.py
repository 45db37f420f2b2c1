"""The trainer CLI, reporting each of Python's cycle collections from the trainer's first on:

    python tests/gc_probe.py OUT_FOLDER --job.config_file ... (the trainer's arguments)

writes ``OUT_FOLDER/rank{R}.json``: per collection, the step the trainer had finished and how many objects
and tensors it found unreachable (``gc.DEBUG_SAVEALL`` keeps them in ``gc.garbage`` for counting).
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch

import titan_dsv4.components.garbage_collection as garbage_collection
from titan_dsv4.train import Trainer, main

OUT = Path(sys.argv.pop(1))
collections: list[dict] = []
trainer: list[Trainer] = []
watching = False


def watch(phase: str, info: dict) -> None:
    if phase == "stop" and watching:
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        collections.append({"step": trainer[0].step if trainer else None, "generation": info["generation"],
                            "objects": len(gc.garbage), "tensors": len(tensors)})
    gc.garbage.clear()


original_init, original_train = garbage_collection.GarbageCollection.__init__, Trainer.train


def start_watching(self, freq: int) -> None:
    global watching
    watching = True
    original_init(self, freq)


def train(self) -> bool:
    trainer.append(self)
    return original_train(self)


garbage_collection.GarbageCollection.__init__ = start_watching
Trainer.train = train
gc.set_debug(gc.DEBUG_SAVEALL)
gc.callbacks.append(watch)
code = main(sys.argv[1:])
OUT.mkdir(exist_ok=True)
(OUT / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(collections))
sys.exit(code)
