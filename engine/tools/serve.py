"""``python -m engine serve NAME``: the engine's metrics over HTTP, in the
Prometheus text format (``engine.prometheus`` names them).

It attaches like any process (on shared memory: one registry entry, so the
traders' takeovers can tell it alive from dead) and only reads: metrics,
snapshot, accounts and the registry, none of which takes a lock a trader
waits on (see ``engine.prometheus``).  It never calls ``recover()``.  Any
path answers with the metrics (``/metrics`` is the usual one).

Exit codes: 0 stopped by SIGINT or SIGTERM, 1 could not attach or bind,
2 refused (bad arguments, or the ``metrics`` extra is missing).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from engine.errors import EngineError, MissingExtraError
from engine.spec import ORDER_SPEC, POSITION_SPEC

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
#: --spec: the machines serve can attach to (attach refuses any other)
_SPECS = {"position": POSITION_SPEC, "order": ORDER_SPEC}
DEFAULT_PORT = 9464   # Prometheus' registry of default exporter ports: free for "engine"


def _err(msg: str) -> None:
    sys.stderr.write(f"serve: {msg}\n")


def cmd_serve(args: argparse.Namespace) -> int:
    """Attach, register the collector, serve until SIGINT or SIGTERM."""
    from engine.core import Engine
    from engine.metrics import collector

    if not 0 <= args.port <= 65535:
        _err(f"--port must be in [0, 65535] (0: any free port), got {args.port}")
        return EXIT_REFUSED
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                                                   "%(message)s")
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        _err(str(MissingExtraError("serve needs prometheus_client: pip install "
                                   "'engine[metrics]' (or pip install prometheus-client)")))
        return EXIT_REFUSED
    try:
        eng = Engine.attach(args.name, url=args.url, spec=_SPECS[args.spec])
    except EngineError as e:
        _err(f"cannot attach {args.name!r}: {e}")
        return EXIT_FAILED
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector(eng))
        try:
            server, thread = start_http_server(args.port, addr=args.addr, registry=registry)
        except OSError as e:
            _err(f"cannot listen on {args.addr}:{args.port}: {e}")
            return EXIT_FAILED
        host, port = str(server.server_address[0]), int(server.server_address[1])
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        sys.stdout.write(f"serving {args.name} on http://{host}:{port}/metrics\n")
        sys.stdout.flush()
        while not stop.wait(1.0):
            pass
        server.shutdown()
        server.server_close()
        thread.join(5.0)
        return EXIT_OK
    finally:
        eng.close()


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``; it sets ``func(args) -> exit code``."""
    p = subparsers.add_parser(
        "serve", help="serve an engine's metrics to Prometheus over HTTP",
        description="Attach to an engine and serve its metrics, positions by state, "
                    "accounts and registry in the Prometheus text format (any path; "
                    "/metrics by convention).  Read-only: it takes no lock the traders "
                    "wait on and never calls recover().  Needs the metrics extra: "
                    "pip install 'engine[metrics]'.")
    p.add_argument("name", metavar="NAME", help="the segment (or Redis engine) name")
    p.add_argument("--url", metavar="URL", default=None,
                   help="the engine on this Redis server (redis://host:port/db, "
                        "redis+cluster://..., unix://...) instead of /dev/shm")
    p.add_argument("--spec", choices=sorted(_SPECS), default="position",
                   help="the engine's machine: the position lifecycle (default) or "
                        "ORDER_SPEC; attach refuses a segment of another machine")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0: any free port, printed)")
    p.add_argument("--addr", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.tools.serve``: this command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m engine.tools.serve",
                                     description="Serve an engine's metrics to Prometheus.")
    add_parsers(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    from engine.cli import run
    return run(parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
