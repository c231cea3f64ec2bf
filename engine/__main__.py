"""``python -m engine``: the command line (stress, bench, top, inspect, ls, rm)."""

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
