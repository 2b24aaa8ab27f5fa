"""`python -m trainer train ...` and `python -m trainer eval ...` (each with `--help`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("train", "eval"):
        print(
            "usage: python -m trainer train --data DIR --output loradir/NAME [...]\n"
            "       python -m trainer eval --adapter loradir/NAME [...]\n"
            "(add --help after train or eval for every flag)"
        )
        return 2
    if argv[0] == "eval":
        from trainer.evaluate import main as eval_main

        return eval_main(argv[1:])
    from trainer.train import main as train_main

    return train_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
