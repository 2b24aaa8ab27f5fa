"""`python -m trainer train ...` (see `python -m trainer train --help`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train",):
        print("usage: python -m trainer train --data DIR --output loradir/NAME [...]  (--help for every flag)")
        return 2
    from trainer.train import main as train_main

    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
