"""``python -m engine.tools.stress stress ...``: the command without the rest of the CLI."""

import argparse

from engine.cli import run
from engine.tools.stress import add_parsers

_p = argparse.ArgumentParser(prog="python -m engine.tools.stress")
add_parsers(_p.add_subparsers(dest="command", required=True))
raise SystemExit(run(_p))
