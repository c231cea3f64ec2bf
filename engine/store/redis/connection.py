"""The Redis backend's connection: one client (or a cluster's) that runs the
engine's functions exactly once.

``_Conn`` packs each call itself, sends it again byte for byte (so with its
request number: the server's request record makes it apply at most once)
after a lost connection or a cluster's refusal of the whole call, follows
MOVED and ASK, loads the library again after a flush, and WAITs for
``?wait=N`` replicas.  Also: the url's check and the server's eviction check.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import threading
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from engine.errors import ArgumentError, BusyError, SegmentError, ServerError
from engine.store.redis.functions import (
    _LIBNAME,
    _LIBRARY,
    _ONCE,
    _SCRIPT,
    _SCRIPT_SHA,
    _VERSION,
    REDIS_RELOAD_TRIES,
    REDIS_REQUEST_WINDOW_MS,
    REDIS_RESEND_BACKOFF_US,
)

#: resends (a lost connection, a cluster's refusal) are logged: see docs/monitoring.md
_log = logging.getLogger("engine")

_DEFAULT_TIMEOUT_S = 5.0
#: how call_every says a call applied but was not confirmed by ?wait=N replicas
_ON_PRIMARY = "applied on the primary, but "
#: what a connection of its own to a server keeps of a client's connection
#: settings (and every ssl_* one); see _Conn._node_conn
_CONN_KWARGS = frozenset(("host", "port", "path", "db", "username", "password",
                          "credential_provider", "client_name", "protocol", "socket_keepalive",
                          "socket_keepalive_options"))


def check_url(url: object) -> str:
    if not isinstance(url, str) or urlsplit(url).scheme not in (
            "redis", "rediss", "redis+cluster", "unix"):
        raise ArgumentError(f"url must be redis://host:port/db, rediss://..., unix://path or "
                            f"redis+cluster://host:port, got {url!r:.80}")
    return url


def _bulk(a: Any, encode: Any) -> bytes:
    """One argument as a RESP bulk string, as redis-py's ``pack_command``
    would send it: ints in decimal, str in UTF-8, bytes as they are, and
    anything else through redis-py's encoder (its conversions and its
    refusals: a bool, a numpy scalar, ... raise redis.DataError)."""
    c = a.__class__
    b = b"%d" % a if c is int else a if c is bytes else a.encode() if c is str else encode(a)
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _packed_keys(keys: Sequence[str | bytes]) -> bytes:
    """Key names as RESP bulk strings, one after the other."""
    return b"".join(_bulk(k, None) for k in keys)


def _readable(sock: Any) -> bool:
    """Has the socket something to read (or its end) right now?  (poll: any fd number)"""
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ServerError("the Redis backend needs the redis package: pip install redis") from None
    return redis


class _Conn:
    """One connection (or a cluster client) that runs the engine's functions.

    Calls are exactly once (with the server's request records, see ``once``
    in functions.lua): no library-level retry is on, and ``fcall`` sends
    a call again itself, byte for byte (so with its request id), after a lost
    connection or a cluster's refusal of the whole call (MOVED, ASK,
    TRYAGAIN, CLUSTERDOWN), until the url's timeout.  A call that still has
    no reply raises ServerError: not known to have applied."""

    def __init__(self, url: str) -> None:
        redis = _redis()
        from redis.backoff import NoBackoff
        from redis.exceptions import (
            AskError,
            ClusterDownError,
            MovedError,
            RedisClusterException,
            TryAgainError,
        )
        from redis.retry import Retry
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        given = query.pop("timeout", None)
        try:
            self.timeout = _DEFAULT_TIMEOUT_S if given is None else float(given)
        except ValueError:
            self.timeout = math.nan
        window_s = REDIS_REQUEST_WINDOW_MS / 1000
        if not 0 < self.timeout < window_s:
            raise ArgumentError(f"the url's timeout must be in (0, {window_s:g}) seconds (shorter "
                                f"than the request window), got {given!r:.40}")
        #: ?wait=N: replicas that must acknowledge each mutating call (WAIT)
        self.wait = _replicas(query.pop("wait", "0"))
        use_functions = query.pop("functions", "1") != "0"
        base = parts._replace(query="&".join(f"{k}={v}" for k, v in query.items()))
        self.cluster = parts.scheme == "redis+cluster"
        self.client: Any   # redis.Redis or redis.cluster.RedisCluster
        # no blind retries anywhere: sending a call again is call's decision
        opts = {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout,
                "retry": Retry(NoBackoff(), 0)}
        self.conn: Any
        #: on a cluster: a connection of our own per node, by node name
        self._nodes: dict[str, Any] = {}
        try:
            if self.cluster:
                from redis.cluster import RedisCluster
                self.client = RedisCluster.from_url(base._replace(scheme="redis").geturl(),
                                                    **opts)
                self.conn = None
                self._enc = self.client.encoder.encode
            else:
                self.client = redis.Redis.from_url(base.geturl(), **opts)
                self.conn = self.client.connection_pool.get_connection()
                self.conn.connect()
                self._enc = self.conn.encoder.encode
        except (redis.RedisError, OSError, ValueError) as e:
            raise ServerError(f"cannot connect to {url}: {e}") from None
        self.url = url
        #: per function: the packed start of its command (see call)
        self._heads: dict[str, bytes] = {}
        self.errors = (redis.RedisError, OSError)
        self.noscript = redis.exceptions.NoScriptError
        self.reply_error = redis.ResponseError
        self._moved, self._ask = MovedError, AskError
        #: a cluster's refusals of a whole call, and failures before a reply:
        #: the call is sent again
        self._resend = (TryAgainError, ClusterDownError, MovedError, AskError,
                        RedisClusterException, redis.ConnectionError, redis.TimeoutError,
                        OSError)
        self._used = time.monotonic()
        #: one call at a time on the connection (and its request numbers, see
        #: RedisStore._fn): two threads never read each other's replies
        self.lock = threading.RLock()
        #: a call is on the connection: a call the same thread makes meanwhile
        #: (a signal handler's) is refused (see _enter)
        self._busy = False
        #: on a cluster: the node that answered the last call (after an ASK,
        #: the slot's importing node): its WAIT goes there (see replicate)
        self._answered: Any = None
        #: calls sent again (a refusal or a lost connection), for tools and tests
        self.resent = 0
        self._resent_logged = (0.0, 0)   # (when, resent): the last resend log line
        self.functions = use_functions and self._load_functions()

    def _load_functions(self) -> bool:
        """Load the library (once per server and version); False: no Functions."""
        redis = _redis()
        try:
            if self.cluster:
                for node in self.client.get_primaries():
                    self._load_on(self.client.get_redis_connection(node))
            else:
                self._load_on(self.client)
        except redis.ResponseError as e:
            if "unknown command" in str(e).lower():
                return False
            raise ServerError(f"cannot load the engine's functions on {self.url}: {e}") from None
        except ServerError:
            raise
        except self.errors as e:
            raise ServerError(f"{self.url}: {e}") from None
        return True

    def _load_on(self, client: Any) -> None:
        """Load the library on one server unless this version is there: a
        user allowed FCALL but not FUNCTION LOAD (nor LIST) still attaches."""
        redis = _redis()
        listed = True
        try:
            if client.execute_command("FUNCTION", "LIST", "LIBRARYNAME", _LIBNAME):
                return
        except redis.exceptions.NoPermissionError:
            listed = False   # this user may not list
        try:
            client.execute_command("FUNCTION", "LOAD", _LIBRARY)
        except redis.ResponseError as e:
            if "already exists" in str(e):
                return
            noperm = isinstance(e, redis.exceptions.NoPermissionError)
            if noperm and not listed:
                return   # may not look, may not load: the first call says if it is missing
            if noperm:
                raise ServerError(f"the engine's functions (library {_LIBNAME}) are not loaded "
                                  "and this user may not load them: attach once as a user "
                                  f"allowed FUNCTION LOAD ({e})") from None
            raise

    def _flushed(self, e: Exception) -> bool:
        """``e`` says the library is gone (FUNCTION FLUSH, a restart): the
        server refused the call before it ran, so it may be sent again once
        the library is loaded."""
        return self.functions and str(e).startswith("Function not found")

    def _head(self, fn: str) -> bytes:
        """The constant start of ``fn``'s command (FCALL name, or EVALSHA sha), packed once."""
        head = ("FCALL", f"e{_VERSION}_{fn}") if self.functions else ("EVALSHA", _SCRIPT_SHA)
        self._heads[fn] = out = b"".join(_bulk(a, self._enc) for a in head)
        return out

    def call(self, key: str | bytes, fn: str, *args: Any) -> Any:
        """``fn`` with one key declared, ``key`` (a function that touches no
        other key: see fcall)."""
        return self.fcall(key, _packed_keys((key,)), 1, fn, args)

    def _cmd(self, key: str | bytes, fn: str, args: tuple[Any, ...],
             more: tuple[str, ...] = ()) -> tuple[Any, ...]:
        """``fn`` on ``key`` (and ``more``, its other declared keys) as a plain command."""
        if self.functions:
            return ("FCALL", f"e{_VERSION}_{fn}", 1 + len(more), key, *more, *args)
        return ("EVALSHA", _SCRIPT_SHA, 1 + len(more), key, *more, fn, *args)

    def refuse_nested(self) -> None:
        """BusyError if a call of this thread is on the connection (this is
        a signal handler's call made in the middle of it): its reply would be
        read as this call's, and the interrupted call's reply as the next one's."""
        if self._busy:
            raise BusyError(
                f"{self.url}: a call on this Engine was made while another call of the same "
                "thread is in flight on its connection (from a signal handler?): refused, "
                "nothing was sent; on Redis an Engine makes one call at a time: attach "
                "another Engine for the handler")

    @contextlib.contextmanager
    def _enter(self) -> Any:
        """The connection's lock, and the connection marked busy meanwhile."""
        with self.lock:
            self.refuse_nested()
            self._busy = True
            try:
                yield
            finally:
                self._busy = False

    def fcall(self, route: str | bytes, keys: bytes, nk: int, fn: str,
              args: Sequence[Any]) -> Any:
        """``_fcall`` under the connection's lock (one call at a time)."""
        with self._enter():
            return self._fcall(route, keys, nk, fn, args)

    def _fcall(self, route: str | bytes, keys: bytes, nk: int, fn: str,
               args: Sequence[Any]) -> Any:
        """Run function ``fn`` of the library with ``nk`` keys declared
        (``keys``, packed: see _packed_keys; ``route`` is one of them, it
        names the shard) and ``args``: one round trip, unless the call has to
        be sent again (see the class).

        The command is packed here (what ``pack_command`` would send, byte
        for byte): redis-py's generic packing was a tenth of the client's
        time per call."""
        enc = self._enc
        packed = b"".join([b"*%d\r\n" % ((3 if self.functions else 4) + nk + len(args)),
                           self._heads.get(fn) or self._head(fn),
                           b"$%d\r\n%d\r\n" % (len(str(nk)), nk), keys,
                           b"" if self.functions else _bulk(fn, enc),
                           *[_bulk(a, enc) for a in args]])
        deadline = time.monotonic() + self.timeout
        delay, loaded, reloads = 0.0, False, 0
        while True:
            try:
                try:
                    return self._send(route, packed, deadline)
                except self.noscript:
                    if loaded:
                        raise
                    self._run(("SCRIPT", "LOAD", _SCRIPT), route)
                    loaded = True
                    continue
                except self.reply_error as e:
                    if not self._flushed(e):
                        raise   # (a redirection is handled below)
                    if reloads == REDIS_RELOAD_TRIES:
                        missing = e
                        break
                    reloads += 1
                    self._load_functions()
                    continue
            except self._resend as e:
                self.resent += 1
                self._log_resend(fn, e)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"{self.url}: {fn} failed (not known to have applied; "
                                      f"the same call may be made again): {e}") from None
                if delay:
                    time.sleep(min(delay, left))
                delay = min(max(2 * delay, REDIS_RESEND_BACKOFF_US / 1e6),
                            64 * REDIS_RESEND_BACKOFF_US / 1e6)
                if self.cluster and not isinstance(e, (self._moved, self._ask)):
                    self._refresh()
            except self.errors as e:
                if fn in _ONCE or "non local key" not in str(e) or time.monotonic() > deadline:
                    raise ServerError(f"{self.url}: {fn} failed: {e}") from None
                # a reader (snapshot) met a key its slot's migration moved: it wrote nothing
                self.resent += 1
                time.sleep(REDIS_RESEND_BACKOFF_US / 1e6)
        raise ServerError(f"{self.url}: the engine's functions (library {_LIBNAME}) are not "
                          "loaded and could not be loaded again: loading them takes a user "
                          f"allowed FUNCTION LOAD ({missing})")

    def _log_resend(self, fn: str, e: BaseException) -> None:
        """A warning for a call sent again: at most one line a second per
        connection, counting the resends since the last (a failover or a
        slot migration resends many calls)."""
        now = time.monotonic()
        at, before = self._resent_logged
        if now - at >= 1.0:
            self._resent_logged = (now, self.resent)
            _log.warning("redis: %s sent again after %s (%d resends on this connection, %d "
                         "since the last line)", fn, type(e).__name__, self.resent,
                         self.resent - before)

    def _fresh(self, conn: Any) -> Any:
        """``conn``, reconnected first if the server closed it while it was
        idle (its ``timeout``): a command never written is sent on a new one."""
        now = time.monotonic()
        sock = conn._sock
        if sock is not None and now - self._used > 0.5 and _readable(sock):
            conn.disconnect()   # readable while idle: closed by the server (or a stray reply)
        self._used = now
        return conn

    def _send(self, key: str | bytes, packed: bytes, deadline: float) -> Any:
        """One attempt: send a packed command to the node of ``key`` and read
        its reply (following a cluster's MOVED and ASK redirections)."""
        if self.conn is not None:
            return self._exchange(self._fresh(self.conn), (packed,), deadline)
        nodes = self.client.nodes_manager
        slot = self.client.keyslot(key)
        node = nodes.get_node_from_slot(slot)
        for _ in range(16):
            try:
                reply = self._exchange(self._own_conn(node), (packed,), deadline)
                self._answered = node
                return reply
            except self._moved as e:
                self.resent += 1
                nodes.move_slot(e)
                node = nodes.get_node_from_slot(slot)
            except self._ask as e:
                self.resent += 1
                target = self._node_of(e.host, e.port)
                reply = self._exchange(self._own_conn(target),
                                       (b"*1\r\n$6\r\nASKING\r\n", packed), deadline, asking=True)
                self._answered = target
                return reply
        raise _redis().exceptions.ClusterError(f"too many redirections for {key!r}")

    def _node_of(self, host: str, port: int) -> Any:
        host, port = self.client.nodes_manager.remap_host_port(host, port)
        node = self.client.get_node(host=host, port=port)
        if node is None:
            from redis import cluster
            make: Any = cluster.ClusterNode   # a node we did not know yet
            node = make(host, port, cluster.PRIMARY)
        return node

    def _own_conn(self, node: Any) -> Any:
        """Our connection to a cluster node (made once, kept)."""
        conn = self._nodes.get(node.name)
        if conn is None:
            pool = self.client.get_redis_connection(node).connection_pool
            conn = self._nodes[node.name] = pool.get_connection()
        return self._fresh(conn)

    def _refresh(self) -> None:
        """Learn the cluster's slots again (after a node failed or refused)."""
        with contextlib.suppress(*self.errors):   # the next attempt says what is wrong
            self.client.nodes_manager.initialize()

    def _exchange(self, conn: Any, packed: tuple[bytes, ...], deadline: float,
                  asking: bool = False) -> Any:
        """Send packed commands on a connection and read the last one's reply."""
        try:
            conn.send_packed_command(packed, check_health=False)
            if asking:
                conn.read_response()
            left = deadline - time.monotonic()
            if left >= self.timeout * 0.999:   # a first attempt: the socket's timeout is the url's
                return conn.read_response()
            return conn.read_response(timeout=max(left, 1e-3))
        except self.reply_error:
            raise   # the whole reply was read: the connection is in step
        except BaseException:
            # a reply may be in flight (a signal, a timeout): never read it as the next one's
            conn.disconnect()
            raise

    def _run(self, cmd: tuple[Any, ...], key: Any = None) -> Any:
        if self.conn is None:
            if cmd[0] == "SCRIPT":   # load on the node that holds the key
                node = self.client.get_node_from_key(key)
                return self.client.execute_command(*cmd, target_nodes=node)
            return self.client.execute_command(*cmd)
        conn = self._fresh(self.conn)
        try:
            conn.send_command(*cmd)
            return conn.read_response()
        except self.reply_error:
            raise   # the whole reply was read: the connection is in step
        except BaseException:
            # a reply may be in flight (a signal, a timeout): never read it as the next one's
            conn.disconnect()
            raise

    def command(self, *cmd: Any, key: Any = None) -> Any:
        """A plain command (on the node of ``key`` on a cluster)."""
        with self._enter():
            return self._command(cmd, key)

    def _command(self, cmd: tuple[Any, ...], key: Any) -> Any:
        try:
            if self.conn is None:
                if key is not None:
                    node = self.client.get_node_from_key(key)
                    return self.client.execute_command(*cmd, target_nodes=node)
                return self.client.execute_command(*cmd)
            return self._run(cmd)
        except self.errors as e:
            raise ServerError(f"{self.url}: {cmd[0]} failed: {e}") from None

    def replicate(self, key: str) -> None:
        """WAIT for ``?wait=N`` replicas to hold this connection's writes so far
        (on a cluster: on the node that answered the last call, which during
        a slot's migration may not be the node of ``key``), within the url's
        timeout.  Fewer: ServerError
        (the writes applied on the primary and are not known to be on N
        replicas: a failover may lose them)."""
        with self._enter():
            self._replicate(key)

    def _replicate(self, key: str) -> None:
        ms = max(1, int(self.timeout * 800))   # inside the socket's timeout (the url's)
        if self.conn is None:   # on the connection the call went on: our own to the node
            node = self._answered   # (which, during a slot's migration, may not own the slot)
            if node is None:
                node = self.client.nodes_manager.get_node_from_slot(self.client.keyslot(key))
            wait = b"*3\r\n$4\r\nWAIT\r\n%s%s" % (_bulk(self.wait, None), _bulk(ms, None))
            try:
                got = int(self._exchange(self._own_conn(node), (wait,),
                                         time.monotonic() + self.timeout))
            except self.errors as e:
                raise ServerError(f"{self.url}: WAIT failed: {e}") from None
        else:
            got = int(self._command(("WAIT", self.wait, ms), key))
        if got < self.wait:
            raise ServerError(
                f"{self.url}: the call applied on the primary, but only {got} of {self.wait} "
                f"replica(s) acknowledged it within {ms / 1000:g} s: a failover may lose it")

    def block_read(self, stream: str, last: bytes, ms: int) -> Any:
        """XREAD BLOCK on one stream; the socket waits a little longer than the server."""
        with self._enter():
            return self._block_read(stream, last, ms)

    def _block_read(self, stream: str, last: bytes, ms: int) -> Any:
        cmd = ("XREAD", "BLOCK", ms, "STREAMS", stream, last) if ms > 0 else \
              ("XREAD", "STREAMS", stream, last)
        try:
            if self.conn is None:
                node = self.client.get_node_from_key(stream)
                return self.client.execute_command(*cmd, target_nodes=node)
            return self._run(cmd)
        except self.errors as e:
            raise ServerError(f"{self.url}: wait failed: {e}") from None

    def blocking_connection(self, key: str,
                            conns: dict[str, tuple[Any, int]]) -> tuple[str, Any, int]:
        """(group, connection, its client id) for blocking reads of ``key``:
        a connection of the caller's own (kept in ``conns``) to the key's
        node; on a cluster one per hash tag (a read of several keys must
        stay in one hash slot), on one server one for every key."""
        if self.conn is None:
            node = self.client.get_node_from_key(key)
            tag = key[: key.index("}") + 1] if "}" in key else key
            name = f"{node.name} {tag}"
            pool = self.client.get_redis_connection(node).connection_pool
        else:
            name, pool = "", self.client.connection_pool
        if name not in conns:
            conn = self._node_conn(pool)
            try:
                conn.send_command("CLIENT", "ID")
                cid = int(conn.read_response())
            except self.errors as e:
                conn.disconnect()
                raise ServerError(f"{self.url}: wait failed: {e}") from None
            conns[name] = (conn, cid)
        conn, cid = conns[name]
        return name, conn, cid

    def unblock(self, client_id: int, key: str) -> bool:
        """End the blocking read of client ``client_id`` (on ``key``'s node)
        now; False if it was not blocked (yet: its command may still be on
        its way to the server)."""
        return bool(self.command("CLIENT", "UNBLOCK", client_id, key=key))

    def _node_conn(self, pool: Any) -> Any:
        """A new connection like ``pool``'s (server, credentials, TLS) whose
        every connect, send and read waits at most the url's timeout, never
        retried: a node that does not answer costs one timeout, once."""
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        kw = {k: v for k, v in pool.connection_kwargs.items()
              if k in _CONN_KWARGS or k.startswith("ssl")}
        return pool.connection_class(**kw, socket_timeout=self.timeout,
                                     socket_connect_timeout=self.timeout,
                                     retry=Retry(NoBackoff(), 0))

    def _call_on_node(self, pool: Any, cmds: dict[str, tuple[Any, ...]],
                      failed: dict[str, str]) -> None:
        """Each command of ``cmds`` (by shard key, all on one server),
        pipelined on a new connection; what did not apply goes into
        ``failed`` (key: why)."""
        redis = _redis()
        todo = list(cmds)
        conn = None
        try:
            conn = self._node_conn(pool)
            for attempt in range(2):   # once more after loading the library or script
                conn.send_packed_command(conn.pack_commands([cmds[k] for k in todo]))
                replies = []
                for _ in todo:
                    try:
                        replies.append(conn.read_response())
                    except redis.ResponseError as e:
                        replies.append(e)
                gone = [k for k, r in zip(todo, replies, strict=True)
                        if isinstance(r, redis.ResponseError) and (
                            isinstance(r, redis.exceptions.NoScriptError)
                            or str(r).startswith("Function not found"))]
                for k, r in zip(todo, replies, strict=True):
                    if isinstance(r, Exception) and (k not in gone or attempt):
                        failed[k] = f"{type(r).__name__}: {r}"
                if not gone or attempt:
                    self._replicated(conn, [k for k in cmds if k not in failed], failed)
                    return
                if self.functions:
                    conn.send_command("FUNCTION", "LOAD", _LIBRARY)
                else:
                    conn.send_command("SCRIPT", "LOAD", _SCRIPT)
                with contextlib.suppress(redis.ResponseError):   # "already exists": loaded
                    conn.read_response()                          # by another client meanwhile
                todo = gone
        except Exception as e:
            for k in todo:
                failed.setdefault(k, f"{type(e).__name__}: {e}")
        finally:
            if conn is not None:
                conn.disconnect()

    def _replicated(self, conn: Any, keys: list[str], failed: dict[str, str]) -> None:
        """With ``?wait=N``: WAIT for N replicas of this connection's writes
        (as ``replicate``); fewer, and ``keys`` go into ``failed``."""
        if not self.wait or not keys:
            return
        # well inside the socket's timeout (the url's): the server ends WAITs on its clock tick
        ms = max(1, int(self.timeout * 500))
        try:
            conn.send_command("WAIT", self.wait, ms)
            got = int(conn.read_response())
        except Exception as e:   # any failure: said, per key
            why = f"{type(e).__name__}: {e}"
        else:
            if got >= self.wait:
                return
            why = f"only {got} of {self.wait} replica(s) acknowledged it within {ms / 1000:g} s"
        for k in keys:
            failed.setdefault(k, f"{_ON_PRIMARY}{why}")

    def call_every(self, cmds: dict[str, tuple[Any, ...]]) -> dict[str, str]:
        """Each command of ``cmds`` (a function call, by its shard's key): each
        server (cluster node) at once, on a connection of its own, so the
        whole takes at most about the url's timeout even if some servers do
        not answer.  Returns the keys whose call did not apply (or may not
        have), with why."""
        if self.cluster:
            by_node: dict[str, tuple[Any, dict[str, tuple[Any, ...]]]] = {}
            for k, cmd in cmds.items():
                node = self.client.get_node_from_key(k)
                pool = self.client.get_redis_connection(node).connection_pool
                by_node.setdefault(node.name, (pool, {}))[1][k] = cmd
            groups = list(by_node.values())
        else:
            groups = [(self.client.connection_pool, dict(cmds))]
        failed: dict[str, str] = {}
        threads = [threading.Thread(target=self._call_on_node, args=(pool, ks, failed),
                                    daemon=True) for pool, ks in groups]
        for t in threads:
            t.start()
        # each node's thread: a connect, a send and a read, each bounded by the timeout
        deadline = time.monotonic() + 3 * self.timeout + 1
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for (_pool, ks), t in zip(groups, threads, strict=True):
            if t.is_alive():
                for k in ks:
                    failed.setdefault(k, f"no answer within {3 * self.timeout + 1:g} s")
        return dict(failed)

    def scan_delete(self, pattern: str) -> int:
        n = 0
        try:
            for k in self.client.scan_iter(match=pattern, count=1000):
                n += int(self.command("DEL", k, key=k))
        except self.errors as e:
            raise ServerError(f"{self.url}: {e}") from None
        return n

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.client.connection_pool.release(self.conn)
            for conn in self._nodes.values():
                conn.disconnect()
            self._nodes.clear()
            self.client.close()
        except Exception:   # closing a connection the server dropped
            pass


def _replicas(v: str) -> int:
    """The ?wait=N of a url: replicas in [0, 64]."""
    if not v.isdigit() or not 0 <= int(v) <= 64:
        raise ArgumentError(f"?wait= in the url must be a number of replicas in [0, 64], "
                            f"got {v!r}")
    return int(v)


def _no_eviction(conn: _Conn) -> None:
    """Refuse a server (any cluster primary) whose ``maxmemory-policy``
    evicts keys: it would drop request records and guard locks (they have
    an expiry: a resent call applied twice, two guards at once) or the
    engine's own keys.  A user not allowed INFO is not checked."""
    redis = _redis()
    try:
        clients = ([conn.client.get_redis_connection(n) for n in conn.client.get_primaries()]
                   if conn.cluster else [conn.client])
        policies = {c.info("memory").get("maxmemory_policy", "noeviction") for c in clients}
    except redis.exceptions.NoPermissionError:
        return
    except conn.errors as e:
        raise ServerError(f"{conn.url}: {e}") from None
    for policy in sorted(policies - {"noeviction"}):
        raise SegmentError(
            f"{conn.url}: the server's maxmemory-policy {policy} may evict the engine's keys "
            "(request records and guard locks first: a resent call would apply twice); an "
            "engine needs maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction)")
