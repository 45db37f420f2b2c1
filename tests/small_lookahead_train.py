"""The trainer CLI tokenizing one document ahead (``TOKENIZE_AHEAD_CHARS = 1``), so that a broken document in
a small test corpus is met mid-run, as one beyond the look-ahead of a real corpus is:

    python tests/small_lookahead_train.py --job.config_file ... (the trainer's arguments)
"""

import sys

import titan_dsv4.components.dataloader as dataloader
from titan_dsv4.train import main

dataloader.TOKENIZE_AHEAD_CHARS = 1
sys.exit(main(sys.argv[1:]))
