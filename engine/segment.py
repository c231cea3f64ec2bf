"""POSIX shared-memory segments: create (reserved, mode 0600), open, list, remove.

Segments are plain POSIX shm objects (``/dev/shm/<name>``), the same objects
``multiprocessing.shared_memory`` uses, opened through ``posix_ipc`` so that
no process ever registers them with multiprocessing's resource tracker (on
Python 3.11/3.12 that tracker unlinks a segment when any process that touched
it exits).  The creator does not own the segment's life either: only
``unlink()`` or ``python -m engine rm`` removes it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import secrets
import shutil

import posix_ipc

from engine._native import ffi, lib
from engine.errors import ArgumentError, SegmentError, SegmentNotFoundError, raise_for

SHM_DIR = "/dev/shm"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise ArgumentError(
            f"segment name must be 1-200 characters of [A-Za-z0-9_.-], got {name!r}")
    return name


def random_name() -> str:
    return "eng_" + secrets.token_hex(8)


def create(name: str, size: int) -> mmap.mmap:
    """Create ``name`` with ``size`` bytes reserved up front (a too-small
    /dev/shm fails here with a clear error, not with SIGBUS later)."""
    mm, fd = create_with_fd(name, size)
    close_lock_fd(fd)
    return mm


def _lock_fd(name: str, mapped_fd: int) -> int:
    """A second, close-on-exec open of the segment file, never mapped.

    An Engine's liveness lock (an OFD lock, see native/engine.h) must live on
    an open file description that nothing else pins: a mapping pins the
    description it was made from, and a fork child inherits mappings, so a
    lock on the mapped description would outlive a dead parent.  C opens it
    (``eng_lock_open``) so that the fork hook knows it from the instant it
    exists: a child forked by another thread at any later point closes its
    copy.  Give it to ``eng_attach`` or to ``close_lock_fd``, never ``os.close``."""
    out = ffi.new("int *")
    rc = lib.eng_lock_open(os.path.join(SHM_DIR, name).encode(), mapped_fd, out)
    if rc == errno.ESTALE:
        raise SegmentError(errno.ESTALE, f"segment {name!r} was replaced while being opened")
    if rc > 0:
        raise SegmentError(rc, f"cannot open segment {name!r}: {os.strerror(rc)}")
    if rc < 0:
        raise_for(rc, name=name)
    return int(out[0])


def close_lock_fd(fd: int) -> None:
    """Close a descriptor from ``create_with_fd`` / ``open_with_fd`` that no
    Engine took (it leaves the fork hook's table in the same step)."""
    lib.eng_lock_close(fd)


def create_with_fd(name: str, size: int) -> tuple[mmap.mmap, int]:
    """``create``, also returning a descriptor for the Engine's liveness lock
    (see ``_lock_fd``)."""
    check_name(name)
    try:
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600)
    except posix_ipc.ExistentialError:
        raise SegmentError(errno.EEXIST, f"segment {name!r} already exists") from None
    except OSError as e:
        raise SegmentError(e.errno, f"cannot create segment {name!r}: {e}") from None
    try:
        os.fchmod(shm.fd, 0o600)          # whatever the umask said
        try:
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as e:
            free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else -1
            raise SegmentError(e.errno, f"cannot reserve {size} bytes for segment {name!r} "
                               f"({os.strerror(e.errno or 0)}; {SHM_DIR} has {free} bytes "
                               "free)") from None
        mm = mmap.mmap(shm.fd, size)
        try:
            return mm, _lock_fd(name, shm.fd)
        except BaseException:
            mm.close()
            raise
    except BaseException:
        shm.close_fd()
        posix_ipc.unlink_shared_memory("/" + name)
        raise
    finally:
        if shm.fd != -1:
            shm.close_fd()


def open_existing(name: str) -> mmap.mmap:
    """Map an existing segment read-write, at its current size."""
    mm, fd = open_with_fd(name)
    close_lock_fd(fd)
    return mm


def open_with_fd(name: str) -> tuple[mmap.mmap, int]:
    """``open_existing``, also returning a descriptor for the Engine's
    liveness lock (see ``_lock_fd``)."""
    check_name(name)
    try:
        shm = posix_ipc.SharedMemory("/" + name)
    except posix_ipc.ExistentialError:
        raise SegmentNotFoundError(errno.ENOENT, f"no segment named {name!r}") from None
    except posix_ipc.PermissionsError as e:
        raise SegmentError(errno.EACCES, f"no permission to open segment {name!r}: {e}") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size == 0:
            raise SegmentError(errno.EINVAL, f"segment {name!r} is empty (0 bytes): "
                               "not an engine segment, or its creator has not sized it yet")
        mm = mmap.mmap(shm.fd, size)
        try:
            return mm, _lock_fd(name, shm.fd)
        except BaseException:
            mm.close()
            raise
    finally:
        shm.close_fd()


def unlink(name: str) -> None:
    check_name(name)
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        raise SegmentNotFoundError(errno.ENOENT, f"no segment named {name!r}") from None


def list_names() -> list[str]:
    """Names of the shm objects in /dev/shm (engine or not)."""
    try:
        return sorted(e.name for e in os.scandir(SHM_DIR) if e.is_file())
    except FileNotFoundError:
        return []
