"""The segment tools on a Redis server: ``python -m engine {ls,inspect,top,rm} --url URL``.

As on shared memory they read raw, never through ``Engine.attach``: no
function library is loaded or needed (a user allowed only reads can look),
engines of any machine spec, and half-made ones, can be shown.  Key layout:
``engine/store/redis/functions.lua`` (per shard ``eng:{name:shard}:`` + ``m`` meta,
``free``, ``open``, ``p:<slot>``, ``g:<slot>``, ``s`` metrics, ...).

``inspect`` shows each shard's halt flag: after a ``halt()`` that could not
reach every shard (a partial halt) this is where to see which shards still
apply transitions.  Reads of a big engine go in pages (SSCAN, pipelined), so
a look never blocks the server.  ``rm`` removes an engine as ``unlink`` does
(``RedisStore.remove``: claimed first, so a live creator is refused unless
``--force``), then deletes what is left of the name (``SCAN`` over every
node): a half-made or half-removed engine's keys too.

Exit codes as on shared memory: 0 done, 1 could not (no such engine, server
unreachable), 2 refused (not an engine's keys, bad name or usage).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from engine.errors import (
    EngineError,
    SegmentError,
    SegmentNotFoundError,
    ServerError,
    redact,
)
from engine.metrics import OP_CALLS, OP_LEGEND, OPS
from engine.spec import POSITION_SPEC
from engine.store import check_name
from engine.store.redis import RedisStore, check_url

__all__ = ["EngineInfo", "cmd_inspect", "cmd_ls", "cmd_rm", "cmd_top", "connect", "list_engines",
           "read_engine"]

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
_MAGIC = b"engine-redis"
_DEFAULT_TIMEOUT_S = 5.0
_PAGE = 1000          # SSCAN / SCAN count and pipeline length of one read step
_KINDS = ("applied", "invalid", "conflicts", "rejected", "halted", "errors", "retries")
_META_RE = re.compile(rb"^eng:\{(.+):0\}:m$")


class ToolError(Exception):
    """A server that cannot be reached or refused a read: exit 1."""


def connect(url: str) -> Any:
    """A plain client for ``url`` (one server, or a cluster), reads only: the
    engine's own query options (``timeout``, ``functions``, ...) are taken
    out, redis-py's (``db``, ``password``, ``username``, ``ssl_*``) kept."""
    import redis
    parts = urlsplit(check_url(url))
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    timeout = float(query.get("timeout", _DEFAULT_TIMEOUT_S))
    kept = {k: v for k, v in query.items()
            if k in ("db", "password", "username") or k.startswith("ssl")}
    base = parts._replace(query="&".join(f"{k}={v}" for k, v in kept.items()))
    opts = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    try:
        if parts.scheme == "redis+cluster":
            from redis.cluster import RedisCluster
            return RedisCluster.from_url(base._replace(scheme="redis").geturl(), **opts)
        client = redis.Redis.from_url(base.geturl(), **opts)
        client.ping()
        return client
    except (redis.RedisError, OSError, ValueError) as e:
        raise ToolError(redact(f"cannot connect to {url}: {e}")) from None


def _tag(name: str, shard: int) -> str:
    return f"eng:{{{name}:{shard}}}:"


def _glob(name: str) -> str:
    """``name`` as a SCAN pattern matching only itself."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", name)


def _meta(client: Any, name: str, shard: int) -> dict[str, str]:
    raw = client.hgetall(_tag(name, shard) + "m")
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}


@dataclass
class ShardInfo:
    """One shard of an engine on Redis."""

    shard: int
    node: str
    halted: bool
    ready: bool
    open: int
    free: int
    accounts_open: int
    guard_locks: int = 0
    states: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineInfo:
    """What a raw read of one engine's keys found."""

    name: str
    status: str                        # "ok", or what is wrong
    meta: dict[str, str] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    metrics: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def capacity(self) -> int:
        return int(self.meta.get("cap", 0) or 0)

    @property
    def halted_shards(self) -> list[int]:
        return [s.shard for s in self.shards if s.halted]

    @property
    def age_s(self) -> float | None:
        created = int(self.meta.get("created_ns", 0) or 0)
        return (time.time_ns() - created) / 1e9 if created else None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["meta"].pop("table", None)   # raw bytes of the transition table
        d.update(ok=self.ok, capacity=self.capacity, halted_shards=self.halted_shards,
                 age_s=self.age_s)
        return d


def _node(client: Any, key: str) -> str:
    if hasattr(client, "get_node_from_key"):
        return str(client.get_node_from_key(key).name)
    kw = client.connection_pool.connection_kwargs
    return str(kw.get("path") or f"{kw.get('host')}:{kw.get('port')}")


def _state_name(index: int, meta: dict[str, str]) -> str:
    if meta.get("fp") == str(POSITION_SPEC.fingerprint) and index < len(POSITION_SPEC.states):
        return POSITION_SPEC.states[index]
    return f"S{index}"


def _shard(client: Any, name: str, s: int, meta: dict[str, str], n: int,
           states: bool) -> ShardInfo:
    P = _tag(name, s)
    key = P + "m"
    info = ShardInfo(s, _node(client, key), meta.get("halted") == "1", meta.get("ready") == "1",
                     int(client.scard(P + "open")), int(client.llen(P + "free")),
                     len(range(s, int(meta.get("nacct", 0) or 0), n))
                     - int(client.llen(P + "afree")))
    if not states:
        return info
    for slots in _pages(client, P + "open"):
        pipe = client.pipeline(transaction=False)
        for slot in slots:
            pipe.hget(P + f"p:{slot.decode()}", "st")
            pipe.exists(P + f"g:{slot.decode()}")
        got = pipe.execute()
        for st, locked in zip(got[::2], got[1::2], strict=True):
            w = int(st or 0)
            label = _state_name(w.bit_length() - 1, meta) if w else "free"
            info.states[label] = info.states.get(label, 0) + 1
            info.guard_locks += int(locked)
    return info


def _pages(client: Any, key: str) -> Any:
    """The members of set ``key`` in pages (SSCAN: no read holds the server)."""
    cursor = 0
    while True:
        cursor, members = client.sscan(key, cursor, count=_PAGE)
        if members:
            yield members
        if int(cursor) == 0:
            return


def _metrics(client: Any, name: str, n: int) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {op: dict.fromkeys(_KINDS, 0) for op in OPS}
    for s in range(n):
        for f, v in client.hgetall(_tag(name, s) + "s").items():
            op, _, what = f.decode().partition(":")
            if op in out and what in out[op]:
                out[op][what] += int(v)
    return out


def read_engine(client: Any, name: str, states: bool = True) -> EngineInfo:
    """One engine's meta, shards (halt flags, counts, states) and metrics.

    Raises ``KeyError`` if nothing of that name is on the server."""
    import redis
    key = _tag(name, 0) + "m"
    try:
        kind = client.type(key)
        if kind == b"none":
            if not _keys_of(client, name, limit=1):
                raise KeyError(name)
            return EngineInfo(name, "half made or half removed: shard 0's meta is missing "
                                    f"(`python -m engine rm {name} --url URL` removes it)")
        if kind != b"hash":
            return EngineInfo(name, f"not an engine's: {key} is a {kind.decode()}")
        meta = _meta(client, name, 0)
        if meta.get("magic", "").encode() != _MAGIC:
            return EngineInfo(name, f"not an engine's: {key} has magic {meta.get('magic')!r}",
                              meta)
        n = int(meta.get("shards", 1))
        info = EngineInfo(name, "ok" if meta.get("ready") == "1" else
                          "not ready: its creator has not finished (or died creating it)", meta)
        for s in range(n):
            m = meta if s == 0 else _meta(client, name, s)
            if not m:
                info.status = f"shard {s}'s meta is missing"
                continue
            info.shards.append(_shard(client, name, s, m, n, states))
        info.metrics = _metrics(client, name, n)
        return info
    except redis.RedisError as e:
        raise ToolError(f"{name}: {e}") from None


def list_engines(client: Any) -> list[EngineInfo]:
    """Every engine on the server (every node of a cluster), without state counts."""
    import redis
    names = []
    try:
        for k in client.scan_iter(match="eng:{*:0}:m", count=_PAGE):
            m = _META_RE.match(k)
            if m:
                names.append(m.group(1).decode(errors="replace"))
    except redis.RedisError as e:
        raise ToolError(str(e)) from None
    out = []
    for name in sorted(set(names)):
        try:
            out.append(read_engine(client, name, states=False))
        except KeyError:
            continue   # removed while we looked
    return out


def _keys_of(client: Any, name: str, limit: int | None = None) -> list[bytes]:
    found = []
    for k in client.scan_iter(match=f"eng:{{{_glob(name)}:*", count=_PAGE):
        found.append(k)
        if limit is not None and len(found) >= limit:
            break
    return found


# -- formatting -----------------------------------------------------------------------------
def _err(msg: str) -> None:
    sys.stderr.write(redact(msg) + "\n")


def _fmt_age(seconds: float | None) -> str:
    from engine.tools.segments import _fmt_age as fmt
    return fmt(seconds)


def _table(rows: list[list[str]], out: TextIO) -> None:
    from engine.tools.segments import _table as table
    table(rows, out)


def _halted(info: EngineInfo) -> str:
    h, n = len(info.halted_shards), len(info.shards)
    if h == 0:
        return "no"
    return "yes" if h == n else f"PARTIAL ({h} of {n} shards: {info.halted_shards})"


# -- the commands -----------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    """List the engines on a server."""
    try:
        found = list_engines(connect(args.url))
    except ToolError as e:
        _err(f"ls: {e}")
        return EXIT_FAILED
    out = sys.stdout
    if args.json:
        json.dump([i.as_dict() for i in found], out, indent=2)
        out.write("\n")
    elif found:
        rows = [["NAME", "SHARDS", "CAPACITY", "OPEN", "AGE", "HALTED", "STATUS"]]
        for i in found:
            rows.append([i.name, str(len(i.shards)), str(i.capacity),
                         str(sum(s.open for s in i.shards)), _fmt_age(i.age_s), _halted(i),
                         i.status])
        _table(rows, out)
    else:
        out.write(f"no engines on {redact(args.url)}\n")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Show an engine's meta, each shard's halt flag, counts and states."""
    try:
        check_name(args.name)
        info = read_engine(connect(args.url), args.name)
    except EngineError as e:
        _err(f"inspect: {e}")
        return EXIT_REFUSED
    except ToolError as e:
        _err(f"inspect: {e}")
        return EXIT_FAILED
    except KeyError:
        _err(f"inspect: no engine named {args.name!r} on {args.url}")
        return EXIT_FAILED
    if args.json:
        json.dump(info.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK if info.ok else EXIT_FAILED
    out = sys.stdout
    out.write(f"engine {info.name} on {redact(args.url)}: status: {info.status}\n")
    if not info.shards:
        return EXIT_FAILED if info.status.startswith(("half", "not ready")) else EXIT_REFUSED
    m = info.meta
    spec = ("default position lifecycle" if m.get("fp") == str(POSITION_SPEC.fingerprint)
            else f"fingerprint {m.get('fp')}")
    out.write(f"  capacity {info.capacity}  shards {len(info.shards)}  keys/position "
              f"{m.get('kpp')}  max accounts {m.get('nacct')}  spec: {spec}  age "
              f"{_fmt_age(info.age_s)}\n")
    out.write(f"engine halted (halt()): {_halted(info)}\n")
    if 0 < len(info.halted_shards) < len(info.shards):
        out.write("  a partial halt: transitions still apply on the shards not halted; "
                  "halt() again (or halt(False) to undo) once every node answers\n")
    labels = sorted({k for s in info.shards for k in s.states},
                    key=lambda k: (k == "free", k))
    rows = [["SHARD", "NODE", "HALTED", "READY", "OPEN", "FREE", "ACCOUNTS", "GUARD LOCKS",
             *labels]]
    for s in info.shards:
        rows.append([str(s.shard), s.node, "YES" if s.halted else "no",
                     "yes" if s.ready else "NO", str(s.open), str(s.free),
                     str(s.accounts_open), str(s.guard_locks),
                     *[str(s.states.get(k, 0)) for k in labels]])
    _table(rows, out)
    out.write("metrics (every client's writes; reads are counted per process):\n")
    rows = [["OP", *[k.upper() for k in _KINDS]]]
    rows += [[OP_CALLS[op], *[str(c[k]) for k in _KINDS]] for op, c in info.metrics.items()]
    _table(rows, out)
    return EXIT_OK if info.ok else EXIT_FAILED


def cmd_rm(args: argparse.Namespace) -> int:
    """Delete every key of the named engines (half-made ones too)."""
    import redis
    try:
        client = connect(args.url)
    except ToolError as e:
        _err(f"rm: {e}")
        return EXIT_FAILED
    code = EXIT_OK
    for name in args.names:
        try:
            check_name(name)
            kind = client.type(_tag(name, 0) + "m")
            foreign = kind not in (b"hash", b"none") or (
                kind == b"hash" and client.hget(_tag(name, 0) + "m", "magic") != _MAGIC)
            if foreign and not args.force:
                _err(f"rm: {_tag(name, 0)}m on {args.url} is not an engine's; refusing "
                     "(use --force to remove the keys anyway)")
                code = max(code, EXIT_REFUSED)
                continue
            n = 0
            if not foreign:
                try:   # the engine's own removal: claimed, so no create or call races it
                    n = RedisStore.remove(args.url, name, force=args.force)
                except SegmentNotFoundError:
                    pass   # no shard 0 meta: remains of a half-made or half-removed engine
                except SegmentError as e:   # a creator still holds its lease
                    _err(f"rm: {e}" + ("" if args.force else " (--force removes it anyway)"))
                    code = max(code, EXIT_FAILED)
                    continue
            for k in _keys_of(client, name):   # remains, or a foreign key with --force
                n += int(client.delete(k))
        except EngineError as e:
            _err(f"rm: {e}")
            code = max(code, EXIT_FAILED if isinstance(e, ServerError) else EXIT_REFUSED)
            continue
        except redis.RedisError as e:
            _err(f"rm: {name}: {e}")
            code = max(code, EXIT_FAILED)
            continue
        if n == 0:
            _err(f"rm: no engine named {name!r} on {args.url}")
            code = max(code, EXIT_FAILED)
        elif not args.quiet:
            sys.stdout.write(f"removed {name} ({n} keys; attached Engines get "
                             "errors on their next call)\n")
    return code


def _render(info: EngineInfo, prev: EngineInfo | None, dt: float, out: TextIO) -> None:
    opened = sum(s.open for s in info.shards)
    out.write(f"engine {info.name}  capacity {info.capacity}  open {opened}  shards "
              f"{len(info.shards)}  engine halted (halt()): {_halted(info)}  status "
              f"{info.status}\n\n")
    rows = [["OP", "OPS/S", "ATTEMPTS", "APPLIED", "INVALID", "CONFLICTS", "REFUSED", "ERRORS",
             "RETRIES"]]
    for op, c in info.metrics.items():
        attempts = sum(c[k] for k in _KINDS if k != "retries")
        rate = "-"
        if prev is not None and dt > 0:
            before = sum(prev.metrics[op][k] for k in _KINDS if k != "retries")
            rate = f"{(attempts - before) / dt:,.0f}"
        rows.append([OP_CALLS[op], rate, str(attempts), str(c["applied"]), str(c["invalid"]),
                     str(c["conflicts"]), str(c["rejected"] + c["halted"]), str(c["errors"]),
                     str(c["retries"])])
    _table(rows, out)
    out.write(OP_LEGEND)
    out.write("(server counts: every client's writes; reads are counted per process)\n")


def cmd_top(args: argparse.Namespace) -> int:
    """Refresh an engine's counts and per-operation rates every --interval seconds."""
    if not (args.interval > 0):
        _err(f"top: --interval must be > 0, got {args.interval}")
        return EXIT_REFUSED
    out = sys.stdout
    clear = out.isatty() and not args.once
    try:
        check_name(args.name)
        client = connect(args.url)
        prev, at = read_engine(client, args.name, states=False), time.monotonic()
        while True:
            time.sleep(args.interval)
            cur, now = read_engine(client, args.name, states=False), time.monotonic()
            if clear:
                out.write("\x1b[H\x1b[2J")
            _render(cur, prev, now - at, out)
            out.flush()
            if args.once:
                return EXIT_OK
            prev, at = cur, now
    except EngineError as e:
        _err(f"top: {e}")
        return EXIT_REFUSED
    except ToolError as e:
        _err(f"top: {e}")
        return EXIT_FAILED
    except KeyError:
        _err(f"top: no engine named {args.name!r} on {args.url}")
        return EXIT_FAILED
