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

from engine.errors import ArgumentError, SegmentError, SegmentNotFoundError

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
    return create_mapped(name, size)[0]


def path_of(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def create_mapped(name: str, size: int) -> tuple[mmap.mmap, tuple[int, int]]:
    """``create``, also returning the file's (st_dev, st_ino).

    An Engine's liveness lock (an OFD lock, see native/engine.h) lives on a
    second open of the file that nothing else pins (a fork child inherits
    mappings, and a mapping pins the description it was made from): C opens
    it (``eng_attach_path``), known to its fork hook from the instant it
    exists, and checks it is this file."""
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
        st = os.fstat(shm.fd)
        return mmap.mmap(shm.fd, size), (st.st_dev, st.st_ino)
    except BaseException:
        shm.close_fd()
        posix_ipc.unlink_shared_memory("/" + name)
        raise
    finally:
        if shm.fd != -1:
            shm.close_fd()


def open_existing(name: str) -> mmap.mmap:
    """Map an existing segment read-write, at its current size."""
    return open_mapped(name)[0]


def open_mapped(name: str) -> tuple[mmap.mmap, tuple[int, int]]:
    """``open_existing``, also returning the file's (st_dev, st_ino) (see
    ``create_mapped``)."""
    check_name(name)
    try:
        shm = posix_ipc.SharedMemory("/" + name)
    except posix_ipc.ExistentialError:
        raise SegmentNotFoundError(errno.ENOENT, f"no segment named {name!r}") from None
    except posix_ipc.PermissionsError as e:
        raise SegmentError(errno.EACCES, f"no permission to open segment {name!r}: {e}") from None
    try:
        st = os.fstat(shm.fd)
        if st.st_size == 0:
            raise SegmentError(errno.EINVAL, f"segment {name!r} is empty (0 bytes): "
                               "not an engine segment, or its creator has not sized it yet")
        return mmap.mmap(shm.fd, st.st_size), (st.st_dev, st.st_ino)
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
