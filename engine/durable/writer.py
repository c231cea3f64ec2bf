"""The journal written to files: the journal directory, ``meta.json``, and
the writer thread every Engine attached to a durable segment runs.

The C side (native/durable.c) does the work with the GIL released: the
thread here only calls ``eng_durable_run`` (which writes while this Engine
holds the writer lease and watches the holder otherwise) until it is
stopped.  The file format is native/engine.h's ("The journal on disk").
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pickle
import stat
import threading
import time
from typing import Any

from engine._native import ffi, lib
from engine.errors import ArgumentError, EngineTypeError, raise_for

#: meta.json's format (ENG_DJ_FORMAT: the files' format)
META_FORMAT = int(lib.ENG_DJ_FORMAT)
META = "meta.json"
#: the journal thread's name (one per Engine attached to a durable segment)
THREAD_NAME = "engine-journal-writer"
_JOIN_S = 5.0   # a stopped writer returns within ENG_DJ_WATCH_NS; this bounds a stuck one


def journal_dir(journal: Any) -> str | None:
    """``create(journal=...)``'s directory (absolute), or None for a journal
    in the segment only (True, False, None)."""
    if journal is None or isinstance(journal, bool):
        return None
    # a str must be an absolute path: journal="yes" is a mistake, not a directory
    if not isinstance(journal, os.PathLike) and not (isinstance(journal, str) and
                                                     journal.startswith("/")):
        raise EngineTypeError(f"journal must be True, False, None or a directory (an absolute "
                              f"path str, or an os.PathLike), got {journal!r}")
    path = os.path.abspath(os.fspath(journal))
    if not isinstance(path, str):
        raise EngineTypeError(f"journal must be a str path, got {journal!r}")
    if len(path.encode()) >= lib.ENG_DJ_PATH_MAX:
        raise ArgumentError(f"journal directory path must be shorter than "
                            f"{lib.ENG_DJ_PATH_MAX} bytes, got {len(path.encode())}")
    return path


def durable_args(sync_ms: Any, ckpt_records: Any, ckpt_s: Any) -> tuple[int, int, int]:
    """create()'s durable options, checked: (sync ns, checkpoint records, checkpoint ns)."""
    lo, hi = lib.ENG_DJ_SYNC_MIN_NS / 1e6, lib.ENG_DJ_SYNC_MAX_NS / 1e6
    if not isinstance(sync_ms, (int, float)) or isinstance(sync_ms, bool):
        raise EngineTypeError(f"journal_sync_ms must be a number, got {sync_ms!r}")
    if not lo <= sync_ms <= hi:
        raise ArgumentError(f"journal_sync_ms must be in [{lo:g}, {hi:g}], got {sync_ms!r}")
    if not isinstance(ckpt_records, int) or isinstance(ckpt_records, bool):
        raise EngineTypeError(f"checkpoint_records must be an int, got {ckpt_records!r}")
    if not 0 <= ckpt_records <= 2**63 - 1:
        raise ArgumentError(f"checkpoint_records must be in [0 (never), 2**63 - 1], "
                            f"got {ckpt_records!r}")
    if not isinstance(ckpt_s, (int, float)) or isinstance(ckpt_s, bool):
        raise EngineTypeError(f"checkpoint_s must be a number, got {ckpt_s!r}")
    if not 0 <= ckpt_s <= 10**9:
        raise ArgumentError(f"checkpoint_s must be in [0 (never), 1e9], got {ckpt_s!r}")
    return int(sync_ms * 1e6), ckpt_records, int(ckpt_s * 1e9)


def prepare_dir(path: str) -> None:
    """Make the journal directory (0700) if absent; refuse one that holds
    another engine's journal (its meta.json, or journal files)."""
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise ArgumentError(f"journal directory {path!r} exists and is not a directory"
                                ) from None
    meta = os.path.join(path, META)
    if os.path.exists(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                other = json.load(f).get("name", "?")
        except (OSError, ValueError, AttributeError):
            other = "? (unreadable meta.json)"
        raise ArgumentError(f"journal directory {path!r} already holds the journal of engine "
                            f"{other!r} (its meta.json); restore it with Engine.restore, or "
                            "give another directory")
    held = sorted(n for n in os.listdir(path)
                  if n.startswith(("journal-", "checkpoint-")))
    if held:
        raise ArgumentError(f"journal directory {path!r} already holds journal files "
                            f"({held[0]}, ...) of another engine and no meta.json; give an "
                            "empty directory")


#: the file every attached Engine of a journal directory holds shared (flock)
LOCK = "lock"


def live_holders(directory: str) -> bool:
    """Whether some attached Engine holds the directory's lock (see Writer.hold)."""
    try:
        fd = os.open(os.path.join(directory, LOCK), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:   # no lock file, or not a directory: nobody holds it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def write_meta(path: str, name: str, capacity: int, spec: Any, options: dict[str, Any]) -> None:
    """meta.json, written once: to a .tmp (0600), fsynced, renamed, the
    directory fsynced."""
    body = {"format": META_FORMAT, "name": name, "capacity": capacity,
            "spec": base64.b64encode(pickle.dumps(spec)).decode("ascii"),
            "spec_name": getattr(spec, "name", None), "options": options}
    tmp = os.path.join(path, META + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
        os.write(fd, json.dumps(body, indent=1, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, META))
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _run(seg: Any, dw: Any) -> None:
    """The thread: C writes or watches until stopped or closed."""
    lib.eng_durable_run(seg, dw)


class Writer:
    """One Engine's part in writing its durable journal: the thread, and
    flush / checkpoint / release through this Engine's writer state."""

    def __init__(self, seg: Any, name: str) -> None:
        self._seg = seg
        self._name = name
        self._pid = os.getpid()
        dw = lib.eng_dw_new()
        if dw == ffi.NULL:
            raise MemoryError("cannot allocate the journal writer's state")
        self._dw = ffi.gc(dw, lib.eng_dw_free)
        self._thread = threading.Thread()
        self._lock_fd = -1
        buf = ffi.new("char[]", lib.ENG_DJ_PATH_MAX)
        if lib.eng_durable_dir(seg, buf, lib.ENG_DJ_PATH_MAX) == 0:   # set up: attach
            self.hold(ffi.string(buf).decode())
        self.start()

    def hold(self, directory: str) -> None:
        """Hold the directory's ``lock`` file shared (flock) while this Engine is
        attached: a restore, which needs it exclusively, refuses a directory a
        live engine writes.  The kernel drops it with the process."""
        if self._lock_fd >= 0:
            return
        fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _unhold(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0 and os.getpid() == self._pid:
            os.close(fd)

    def start(self) -> None:
        """Start the thread (again, after ``stop``: a close that did not happen)."""
        if self._thread.is_alive() or os.getpid() != self._pid:
            return
        lib.eng_dw_stop(self._dw, 0)
        self._thread = threading.Thread(target=_run, args=(self._seg, self._dw),
                                        name=THREAD_NAME, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """The Engine's finalizer (garbage-collected or at exit without close):
        stop, then write what this Engine can; never raises."""
        if os.getpid() != self._pid:
            return
        self.stop()
        with contextlib.suppress(Exception):
            self.release()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread (it returns within ENG_DJ_WATCH_NS); idempotent;
        nothing in a forked child (the thread is not there)."""
        if os.getpid() != self._pid:
            return
        lib.eng_dw_stop(self._dw, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)

    def release(self) -> int:
        """close(): write and fdatasync everything if this Engine holds the
        lease or can take it, then give it back.  The durable seq."""
        out = ffi.new("uint64_t *")
        rc = lib.eng_durable_release(self._seg, self._dw, 0, out)
        if rc:
            raise_for(rc, name=self._name)
        self._unhold()
        return int(out[0])

    def flush(self, timeout: float) -> int:
        """fdatasync every record committed before the call; the durable seq."""
        out = ffi.new("uint64_t *")
        deadline = time.monotonic() + timeout
        while True:   # in slices: Ctrl-C gets through between them
            left = deadline - time.monotonic()
            rc = lib.eng_durable_flush(self._seg, self._dw,
                                       max(0, int(min(left, 0.2) * 1e9)), out)
            if rc != lib.ENG_ETIMEDOUT or left <= 0.2:
                break
        if rc == lib.ENG_ETIMEDOUT:
            from engine.errors import WaitTimeout
            info = self.info()
            raise WaitTimeout(f"engine {self._name!r}: flush did not finish within {timeout} s "
                              f"(journal seq {info.journal_seq}, written {info.written_seq}, "
                              f"durable {info.durable_seq}; the writer is pid "
                              f"{info.writer_pid})")
        if rc:
            raise_for(rc, name=self._name)
        return int(out[0])

    def checkpoint(self) -> int:
        """Write a checkpoint now; its start seq."""
        out = ffi.new("uint64_t *")
        rc = lib.eng_durable_checkpoint(self._seg, self._dw, out)
        if rc:
            raise_for(rc, name=self._name)
        return int(out[0])

    def info(self) -> Any:
        out = ffi.new("eng_durable_info *")
        rc = lib.eng_durable_info_of(self._seg, out)
        if rc:
            raise_for(rc, name=self._name)
        return out


class _Owner:
    """What a raw attach's mapping belongs to (flush_segment)."""


def flush_segment(name: str) -> int | None:
    """``python -m engine rm NAME``: before the segment goes, write and
    fdatasync its journal's records not yet on disk (taking the writer lease
    if it is free or its holder is dead).  The durable seq; None if the
    segment's journal is not written to files."""
    from engine.spec import POSITION_SPEC
    from engine.store.shm import attach_mapped, open_mapped

    owner = _Owner()   # the mapping lives as long as it does: keep it until the end
    att = attach_mapped(owner, name, open_mapped(name), POSITION_SPEC, check_spec=False)
    try:
        if att.seg.durable == ffi.NULL:
            return None
        dw = ffi.gc(lib.eng_dw_new(), lib.eng_dw_free)
        out = ffi.new("uint64_t *")
        rc = lib.eng_durable_release(att.seg, dw, 0, out)
        if rc:
            raise_for(rc, name=name)
        return int(out[0])
    finally:
        att.finalizer()
        del owner
