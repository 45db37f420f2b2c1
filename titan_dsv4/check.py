"""Check a train config against the world size a launcher is about to start, before it starts anything:

    python -m titan_dsv4.check [--ngpu N] --job.config_file X.toml [--section.key value ...]

The trainer's own checks (``validate_run``): silent with exit 0 when it would start,
else its one message and exit 2. ``scripts/run_train.sh`` and ``scripts/slurm/node.sh`` run it first, so a
mistake is one line, not one per rank plus torchrun's traceback.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .config.validate import validate_run, world_from_degrees


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan_dsv4.check", add_help=False)
    parser.add_argument("--ngpu", type=int, default=None, help="the world size about to be launched (default: the "
                        "product of the config's degrees)")
    opts, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(rest)
        validate_run(config, opts.ngpu or world_from_degrees(config))
    except ConfigError as e:
        print(f"titan_dsv4: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
