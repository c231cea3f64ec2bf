"""A private ``redis-server`` for a tool run or a test session.

``PrivateRedis()`` starts one on a free 127.0.0.1 port, with persistence off
(no RDB snapshots, no AOF) and its working directory in a temporary
directory, waits until it answers, and ``stop()`` (or leaving the ``with``
block) terminates it and removes the directory.  ``stress --url auto``, the
bench's Redis peers and the test session's server all use it.

For fault tests: ``appendfsync="always"`` (or ``"everysec"``) turns the AOF
on, ``replicaof=port`` makes it a replica of another loopback server, and
``restart(kill=True)`` kills it (SIGKILL) and starts it again on the same
port and directory, so what it kept is what its persistence kept.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PrivateRedis", "RedisUnavailable"]


class RedisUnavailable(RuntimeError):
    """No redis-server here, or it did not start; the text says why."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(port: int) -> bool:
    """Does the server on ``port`` answer PING?"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A redis-server of our own on a free loopback port, no persistence."""

    def __init__(self, start_timeout: float = 10.0, prefix: str = "engine-redis-", *,
                 appendfsync: str | None = None, replicaof: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable("redis-server is not on PATH (apt-get install redis-server)")
        self.exe = exe
        self.tmp: tempfile.TemporaryDirectory[str] | None = tempfile.TemporaryDirectory(
            prefix=prefix)
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = Path(self.tmp.name, "redis.log")
        self.args = [
            "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--save", "", "--dir", self.tmp.name, "--logfile", str(self.log),
            "--daemonize", "no",
            *(["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else
              ["--appendonly", "no"]),
            *(["--replicaof", "127.0.0.1", str(replicaof)] if replicaof else [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self._start(start_timeout)

    def _start(self, start_timeout: float) -> None:
        assert self.tmp is not None
        self.proc = subprocess.Popen(
            [self.exe, *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-400:] if self.log.exists() else ""
                self.stop()
                raise RedisUnavailable(f"redis-server did not start on 127.0.0.1:{self.port}: "
                                       f"{tail.strip() or 'no log'}")
            time.sleep(0.02)

    def restart(self, kill: bool = True, start_timeout: float = 10.0) -> None:
        """Kill (SIGKILL; or terminate) the server and start it again on the
        same port and directory: it keeps only what its persistence kept."""
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
        self._start(start_timeout)

    def stop(self) -> None:
        """Terminate the server (kill it if it does not go in 5 s); idempotent."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None

    def __enter__(self) -> PrivateRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PrivateRedis {self.url} {'running' if self.proc else 'stopped'}>"
