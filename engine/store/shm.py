"""The shared-memory backend: POSIX segments created (reserved, mode 0600),
formatted, attached, listed and removed.

The store is ``engine._native.lib`` itself: an Engine on shared memory calls
the C functions directly, with its ``eng_seg *`` as their first argument (and
its hot calls are C method descriptors, see native/fastpath.c), so this
module only makes, attaches and removes segments.

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
import shutil
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import posix_ipc

from engine._native import ffi, lib
from engine.errors import (
    ArgumentError,
    SegmentError,
    SegmentNotFoundError,
    header_detail,
    raise_for,
)
from engine.records import PROC_DTYPE
from engine.spec import MachineSpec
from engine.store import Attached, Store, check_name, random_name

__all__ = ["SHARED_MEMORY", "SHM_DIR", "check_name", "create", "create_mapped", "entry_alive",
           "list_names", "open_existing", "open_mapped", "path_of", "random_name",
           "registry_liveness", "unlink"]

SHM_DIR = "/dev/shm"
_REGISTRY_SIZE: int = ffi.sizeof("eng_proc") * lib.ENG_MAX_PROCS

if TYPE_CHECKING:
    # the C library is the store: mypy checks lib (engine/_native.pyi, generated from the
    # cdef by native/gen_stub.py) against every call of the interface
    _LIB_IS_A_STORE: Store = lib


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


# -- the process registry ----------------------------------------------------------------
def entry_alive(probe_fd: int | None, registry_off: int, index: int, pid: int,
                start_time: int) -> bool:
    """Is registry entry ``index`` (of ``pid``) alive, as the engine judges it:
    its liveness lock, asked through ``probe_fd`` (a descriptor of the segment
    file that holds no entry's lock: asking through the one that holds it says
    "free"); without one, pid and start time as this pid namespace sees them."""
    held = -1 if probe_fd is None else lib.eng_entry_held(probe_fd, registry_off, index)
    return held > 0 if held >= 0 else bool(lib.eng_proc_alive(pid, start_time))


def registry_liveness(name: str, seg: Any, mm: mmap.mmap) -> tuple[int, int]:
    """(alive, dead) used entries of the registry of segment ``name``, which
    ``seg`` is attached to through the mapping ``mm`` (read from the mapping at
    the offset attach checked, liveness probed through a descriptor of its own)."""
    off = int(ffi.cast("uintptr_t", seg.registry)) - int(ffi.cast("uintptr_t", seg.base))
    data = mm[off:off + _REGISTRY_SIZE]
    if len(data) != _REGISTRY_SIZE:
        return 0, 0
    entries = np.frombuffer(data, dtype=PROC_DTYPE, count=lib.ENG_MAX_PROCS)
    try:
        probe: int | None = os.open(path_of(name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        probe = None
    try:
        alive = [entry_alive(probe, off, int(i), int(entries[i]["pid"]),
                             int(entries[i]["start_time"]))
                 for i in np.flatnonzero(entries["pid"])]
    finally:
        if probe is not None:
            os.close(probe)
    return sum(alive), len(alive) - sum(alive)


# -- the backend: create (format), attach, unlink --------------------------------------
def _detach(seg: Any, buf: Any, mm: mmap.mmap) -> None:
    """Leave the registry and close the liveness descriptor (C does neither
    in a fork child), then unmap (the cffi buffer must go first)."""
    lib.eng_detach(seg)
    ffi.release(buf)
    mm.close()


def _machine_mismatch(hdr: Any, spec: MachineSpec) -> str | None:
    """The first header word of the machine that differs from what ``spec``
    compiles to (the fingerprint alone would let a crafted table or layout
    run another machine under the spec's name), as a message; None if all agree."""
    lay = spec.c_layout(hdr.rec.keys_per_position)
    want = {"n_states": len(spec.states), "n_triggers": len(spec.triggers),
            "initial_index": spec.state_index[spec.initial], "closed_mask": spec.closed_mask,
            "table": spec.table_bytes(), "rec.n_words": lay.n_words,
            "rec.word_type": bytes(ffi.buffer(lay.word_type)),
            "rec.roles": bytes(ffi.buffer(lay.roles)),
            "rec.exit_state": lay.exit_state, "rec.exit_trigger": lay.exit_trigger}
    got = {"n_states": hdr.n_states, "n_triggers": hdr.n_triggers,
           "initial_index": hdr.initial_index, "closed_mask": hdr.closed_mask,
           "table": bytes(ffi.buffer(hdr.table)), "rec.n_words": hdr.rec.n_words,
           "rec.word_type": bytes(ffi.buffer(hdr.rec.word_type)),
           "rec.roles": bytes(ffi.buffer(hdr.rec.roles)),
           "rec.exit_state": hdr.rec.exit_state, "rec.exit_trigger": hdr.rec.exit_trigger}
    for word, value in want.items():
        if got[word] != value:
            if isinstance(value, bytes):
                pairs = enumerate(zip(got[word], value, strict=True))
                at = next(i for i, (a, b) in pairs if a != b)
                return f" (header word {word}[{at}] = {got[word][at]}, the spec has {value[at]})"
            return f" (header word {word} = {got[word]}, the spec has {value})"
    return None


def attach_mapped(owner: object, name: str, mapped: tuple[mmap.mmap, tuple[int, int]],
                  spec: MachineSpec, *, check_spec: bool) -> Attached:
    """Attach to a mapped segment; ``mapped`` is (mapping, (st_dev, st_ino) of
    its file) and ``owner`` (the Engine) owns the mapping from here on."""
    mm, (dev, ino) = mapped
    buf = ffi.from_buffer(mm)
    seg = ffi.new("eng_seg *")
    # registered before attaching: an exception at any point after the C
    # call (a signal handler's included) still frees the registry entry
    finalizer = weakref.finalize(owner, _detach, seg, buf, mm)
    # C opens the liveness descriptor itself: it never exists outside C, so
    # neither a fork from another thread nor an exception here can keep it
    rc = lib.eng_attach_path(seg, buf, len(mm),
                             spec.fingerprint if check_spec else 0,
                             path_of(name).encode(), dev, ino)
    if rc:
        if rc == errno.ESTALE:
            finalizer()
            raise SegmentError(rc, f"segment {name!r} was replaced while being opened")
        if rc > 0:
            finalizer()
            raise SegmentError(rc, f"cannot open segment {name!r}: {os.strerror(rc)}")
        detail = header_detail(buf, len(mm), spec.fingerprint if check_spec else 0)
        finalizer()
        raise_for(rc, name=name, spec=spec.name, detail=detail)
    wrong = _machine_mismatch(seg.hdr, spec) if check_spec else None
    if wrong:
        finalizer()
        raise_for(lib.ENG_ESPEC, name=name, spec=spec.name, detail=wrong)
    return Attached(lib, seg, finalizer, mm, buf)


class SharedMemory:
    """The shared-memory backend (``engine.store.backend(None)``)."""

    url: str | None = None

    def create(self, owner: object, name: str, spec: MachineSpec, capacity: int,
               keys_per_position: int, max_accounts: int, shards: int | None, *,
               journal_records: int, journal_flags: int) -> Attached:
        """Create segment ``name``, format it for ``spec`` and attach to it;
        its journal holds ``journal_records`` records (0: none)."""
        if shards is not None:
            raise ArgumentError("shards is for an engine on Redis (url=...)")
        size = lib.eng_segment_size_journal(capacity, spec.record.n_words, keys_per_position,
                                            max_accounts, journal_records)
        mm, ident = create_mapped(name, size)
        table = spec.table_bytes()
        with ffi.from_buffer(mm) as buf:
            rc = lib.eng_format(buf, size, capacity, table, len(spec.states),
                                len(spec.triggers), spec.state_index[spec.initial],
                                spec.closed_mask, spec.fingerprint, os.getpid(),
                                spec.c_layout(keys_per_position), max_accounts,
                                journal_records, journal_flags)
        if rc:
            mm.close()
            unlink(name)
            raise ArgumentError(f"cannot format segment {name!r} (code {rc})")
        try:
            return attach_mapped(owner, name, (mm, ident), spec, check_spec=True)
        except BaseException:
            unlink(name)
            raise

    def attach(self, owner: object, name: str, spec: MachineSpec,
               incarnation: int | None) -> Attached:
        """Attach to segment ``name``, which must run ``spec``."""
        return attach_mapped(owner, name, open_mapped(name), spec, check_spec=True)

    def unlink(self, name: str, seg: Any) -> None:
        unlink(name)

    def remover(self, name: str, seg: Any) -> Callable[[], None]:
        """Unlinks ``name`` while it still names this attachment's file (C's
        own descriptor of it says which): never a segment created again
        under the name after someone else removed this one."""
        st = os.fstat(seg.fd)
        ident = (st.st_dev, st.st_ino)

        def remove() -> None:
            st = os.stat(path_of(name))
            if (st.st_dev, st.st_ino) == ident:
                unlink(name)
        return remove


SHARED_MEMORY = SharedMemory()
