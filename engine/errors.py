"""Exceptions.  C returns status codes; each maps to one class here.

``EngineError`` is the base and is never raised itself.  Each subclass also
inherits the builtin a caller would naturally catch (``SlotError`` is an
``IndexError``, ``PriceError`` a ``ValueError``, ...).
"""

from __future__ import annotations

import os
import re
from typing import Any, NoReturn

from engine._native import ffi, lib

# a url's password: ``scheme://user:PASSWORD@`` (up to the last ``@`` before a
# ``/``, as urlsplit reads it) and ``?password=PASSWORD`` (redis-py takes both)
_URL_PASSWORD = re.compile(r"(://[^\s/@:]*:)[^\s/]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the password of every url in it replaced by ``***``.

    Engine reprs, handle reprs and every error message go through it; the
    url itself (``Engine.url``, ``Handle.url``) keeps the password, since a
    worker needs it to attach."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


class EngineError(Exception):
    """Base of every error the engine raises (never raised itself).

    Its message never shows a url's password (see ``redact``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    #: transition_many: every element's outcome when an element failed with an
    #: error (a failed element holds ENG_MANY_ERROR | -code); else None
    outcomes: Any = None


class SlotError(EngineError, IndexError):
    """A slot id out of range."""


class NotOpenError(SlotError):
    """An id that names no open position: never issued, or released."""


class StaleIdError(NotOpenError, LookupError):
    """An id whose opening was released: the slot is free or holds another
    position now.  The id never reads or changes that position."""


class EngineTypeError(EngineError, TypeError):
    """An argument of the wrong type (slot, trigger, price, array dtype)."""


class PriceError(EngineError, ValueError):
    """A price that is NaN, infinite, zero or negative."""


class TriggerError(EngineError, ValueError):
    """A trigger the engine's machine spec does not have."""


class ArgumentError(EngineError, ValueError):
    """Any other argument out of its allowed range."""


class FieldError(ArgumentError):
    """A record field the spec does not have, a value outside its type's
    range, or a field that is set at open only."""


class KeyExistsError(EngineError, ValueError):
    """The key already names another open position; nothing was changed."""


class KeyLimitError(ArgumentError):
    """The position already has ``keys_per_position`` keys."""


class UnknownAccountError(NotOpenError):
    """An account id that was never issued (or out of range)."""


class StaleAccountError(StaleIdError):
    """An account id whose opening was closed: it never reads or changes
    the account that reuses the record."""


class MoneyError(ArgumentError):
    """An amount of money that is negative, not finite, finer than the
    fixed point or beyond its range."""


class RiskLimitError(EngineError):
    """An opening (or a withdrawal) the account's limits refuse: halted,
    exposure, count or cash.  Nothing was changed.  ``limit`` names the
    limit; ``books`` are the account's books it was checked against."""

    def __init__(self, message: str, limit: str = "", books: Any = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.books = books


class CapacityError(EngineError, MemoryError):
    """No free slot, or no free entry in the process registry."""


class BusyError(EngineError, TimeoutError):
    """A live writer held a record past the bound; nothing was changed."""


class WaitTimeout(EngineError, TimeoutError):
    """``wait_for_change`` saw no change before its timeout."""


class JournalLappedError(EngineError):
    """A journal reader fell a whole ring behind: the records after its seq
    were overwritten before it read them.  Nothing is skipped silently:
    ``resume_seq`` is the oldest seq still retained (resume with
    ``events(since=resume_seq - 1)`` after a resync from ``snapshot()``)."""

    def __init__(self, message: str, resume_seq: int = 0) -> None:
        super().__init__(message)
        self.resume_seq = resume_seq


class DurabilityError(EngineError, OSError):
    """The journal's file writer failed (disk full, I/O error): the engine is
    fail-stop, so every change is refused (nothing changed) until the writer
    can write again.  ``durable_seq`` is what is on disk; ``writer_pid`` the
    writer's process; ``failure`` its errno."""

    def __init__(self, message: str, durable_seq: int = 0, writer_pid: int = 0,
                 failure: int = 0) -> None:
        super().__init__(message)
        self.durable_seq = durable_seq
        self.writer_pid = writer_pid
        self.failure = failure


class JournalFullError(DurabilityError, TimeoutError):
    """The journal's ring is full of records the file writer has not written
    yet, and it did not catch up within ``ENG_DJ_ROOM_WAIT_NS`` (its process
    stopped, or the disk too slow): the change was refused, nothing changed."""


class SegmentError(EngineError, OSError):
    """A segment that cannot be created or attached (foreign, corrupt, ...)."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """No segment of that name exists."""


class SpecMismatchError(SegmentError):
    """The segment runs another machine spec than the one given."""


class RestoreError(EngineError, ValueError):
    """A journal directory that cannot be restored: corruption in the
    middle of a journal file (a bad frame with valid ones after it), a gap
    in the seqs, a bad meta.json or a record the segment refuses.  ``path``
    names the file and ``offset`` the byte in it (None where none applies)."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SpecError(EngineError, ValueError):
    """A machine spec that is not well formed."""


class ServerError(EngineError, ConnectionError):
    """The Redis server cannot be reached, went away, or failed a call.

    A call that raises this ran on the server wholly or not at all (every
    call is one atomic function); which of the two is not known."""


class MissingExtraError(EngineError, ImportError):
    """An optional feature's package is not installed (the message names
    the extra that installs it)."""


class ClosedError(EngineError, RuntimeError):
    """The Engine was closed, or inherited through ``fork()``."""


class InternalError(EngineError, RuntimeError):
    """A status the API should never see (a bug: please report it)."""


def shown(value: Any) -> str:
    """``value`` for a message: its repr cut to 40 characters; an int too long
    for repr (past ``sys.get_int_max_str_digits()``) by its size; a value
    whose repr fails by its type.  A message must never fail in its place."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    try:
        return f"{value!r:.40}"
    except Exception:
        return f"a {type(value).__name__} without a repr"


class _Shown(str):
    """A value already shown: ``{x!r}`` in a template prints it as it is."""

    def __repr__(self) -> str:
        return str(self)


class _Context(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


_ID_MAX = f"{lib.ENG_ID_MAX:#x}"
_SEGMENT = "segment {name!r} "

# Each C status code: the one exception class it raises and its message.
ERRORS: dict[int, tuple[type[EngineError], str]] = {
    lib.ENG_EBADSLOT: (SlotError, "id {id!r} is out of range: an id is an int in "
                                  f"[1, {_ID_MAX}] whose slot (its low 24 bits, here "
                                  "{slot}) is in [0, {capacity})"),
    lib.ENG_ENOTOPEN: (NotOpenError, "id {id!r} was never issued (slot {slot}): ids come from "
                                     "open_position, they are not slot indexes"),
    lib.ENG_ESTALE: (StaleIdError, "id {id!r} is stale: its opening of slot {slot} was released"),
    lib.ENG_EBADTRIGGER: (TriggerError, "trigger {trigger!r} out of range [0, {n_triggers}) of "
                                        "spec {spec!r}"),
    lib.ENG_EBADPRICE: (PriceError, "price must be finite and > 0, got {price!r}"),
    lib.ENG_EBADARG: (ArgumentError, "argument out of range: {what}"),
    lib.ENG_EFULL: (CapacityError, "all {capacity} slots are in use; release closed positions "
                                   "or create a larger engine"),
    lib.ENG_ETIMEDOUT: (WaitTimeout, "id {id!r}: no change within {timeout} s"),
    lib.ENG_EBUSY: (BusyError, "id {id!r}: a live writer held the record past the bound; "
                               "nothing was changed"),
    lib.ENG_EMAGIC: (SegmentError, _SEGMENT + "is not an engine segment (bad magic number)"),
    lib.ENG_ELAYOUT: (SegmentError, _SEGMENT + "has another layout version (this build reads "
                                    f"version {lib.ENG_LAYOUT_VERSION})"),
    lib.ENG_ESIZE: (SegmentError, _SEGMENT + "is truncated or its sizes disagree with its "
                                  "header{detail}"),
    lib.ENG_ENOTREADY: (SegmentError, _SEGMENT + "is not ready (its creator has not finished "
                                      "formatting it)"),
    lib.ENG_ESPEC: (SpecMismatchError, _SEGMENT + "runs another machine spec than "
                                       "{spec!r}{detail}; attach with the creator's spec"),
    lib.ENG_ENOPROC: (CapacityError, _SEGMENT + f"all {lib.ENG_MAX_PROCS} registry entries are "
                                     "taken; close unused Engines or run recover()"),
    lib.ENG_ECORRUPT: (SegmentError, _SEGMENT + "has a corrupt header{detail}"),
    lib.ENG_ECLOSED: (ClosedError, "engine {name!r} is closed"),
    lib.ENG_EFORKED: (ClosedError, "engine {name!r} was inherited through fork(): this process "
                                   "must attach its own, with Engine.attach(handle)"),
    lib.ENG_ERECOVERING: (BusyError, "another live process is running recover() on {name!r}; "
                                     "try again when it is done"),
    lib.ENG_EGUARDFAIL: (InternalError, "id {id!r}: the guard raised and a signal handler's "
                                        "exception raised over it, so neither could be kept; "
                                        "nothing was changed"),
    lib.ENG_ETOOMANY: (CapacityError, f"this process already has {lib.ENG_MAX_LOCAL_ENGINES} "
                                      "Engines attached; close some"),
    lib.ENG_EKEYEXISTS: (KeyExistsError, "key {key!r} already names an open position; "
                                         "nothing was changed"),
    lib.ENG_EKEYLIMIT: (KeyLimitError, "key {key!r} was not bound: an opening holds at most "
                                       "keys_per_position={keys_per_position} keys; "
                                       "nothing was changed"),
    lib.ENG_EKEYFULL: (CapacityError, "key {key!r}: both of its index buckets are full; "
                                      "create the engine with a larger capacity"),
    lib.ENG_EBADFIELD: (FieldError, "a field value is out of its type's range, or sets a field "
                                    "that is set at open only: {fields}"),
    lib.ENG_EBADKEY: (ArgumentError, f"a key is 1 to {lib.ENG_KEY_MAX} bytes, got {{key!r}}"),
    lib.ENG_ERISK_HALTED: (RiskLimitError, "account {account!r} is halted: no opening until "
                                           "halt_account(id, False){numbers}"),
    lib.ENG_ERISK_EXPOSURE: (RiskLimitError, "account {account!r}: exposure limit{numbers}"),
    lib.ENG_ERISK_COUNT: (RiskLimitError, "account {account!r}: position count limit{numbers}"),
    lib.ENG_ERISK_CASH: (RiskLimitError, "account {account!r}: not enough cash beyond what is "
                                         "reserved{numbers}"),
    lib.ENG_EBADACCOUNT: (UnknownAccountError, "account id {account!r} was never issued: an "
                                               "account id is an int from open_account whose "
                                               "index (low 24 bits) is in [0, {max_accounts})"),
    lib.ENG_ESTALEACCOUNT: (StaleAccountError, "account id {account!r} is stale: that opening "
                                               "of the account was closed"),
    lib.ENG_EBADMONEY: (MoneyError, "money out of range: {money}"),
    lib.ENG_EACCTFULL: (CapacityError, "all {max_accounts} account records are open; close one "
                                       "or create the engine with a larger max_accounts"),
    lib.ENG_EACCTBUSY: (ArgumentError, "account {account!r} has open positions or reservations; "
                                       "close them before close_account"),
    # statuses the API consumes itself; seeing one is a bug
    lib.ENG_EVERSION: (InternalError, "internal status {code} ({why}) escaped: please report"),
    lib.ENG_ELAPPED: (JournalLappedError, "journal of {name!r}: the records after the "
                                          "reader's seq were overwritten"),
    lib.ENG_ENOJOURNAL: (ArgumentError, "engine {name!r} has no journal (it is on only "
                                        "when created with journal=True)"),
    lib.ENG_EJOURNALFULL: (JournalFullError, "the journal's file writer (pid {writer_pid}) is "
                           "behind: the ring holds only records not yet in the files "
                           "(journal seq {journal_seq}, written {written_seq}, durable "
                           "{durable_seq}) and none was freed within "
                           f"{lib.ENG_DJ_ROOM_WAIT_NS / 1e9:g} s; nothing was changed"),
    lib.ENG_EDURABLE: (DurabilityError, "the journal's file writer (pid {writer_pid}) failed: "
                       "{failure_words} (errno {failure}); every change is refused until it "
                       "writes again (durable seq {durable_seq}); nothing was changed"),
    lib.ENG_EGUARDED: (InternalError, "internal status {code} ({why}) escaped: please report"),
    lib.ENG_EINTR: (InternalError, "internal status {code} ({why}) escaped: please report"),
}


#: header words that are test hooks (see "test faults" in native/segment.c)
FAULT_WORDS = ("fault_flags", "test_pause_ns")
_FAULT_BITS = sum(getattr(lib, n) for n in dir(lib) if n.startswith("ENG_FAULT_"))


def header_detail(buf: Any, size: int, fingerprint: int) -> str:
    """For a refused attach: ": header word <name> = <value>", the first bad
    header word C found (and why, for a test fault word); "" if none."""
    field, value = ffi.new("const char **"), ffi.new("uint64_t *")
    lib.eng_validate_detail(buf, size, fingerprint, field, value)
    if field[0] == ffi.NULL:
        return ""
    name, v = ffi.string(field[0]).decode(), int(value[0])
    detail = f": header word {name} = {v} ({v:#x})"
    if name in FAULT_WORDS:
        detail += (f"; {name} is a test fault switch, allowed only in a process whose own "
                   "test switch is on (ENGINE_TEST_FAULTS=1 in its environment, or "
                   "eng_test_faults(1)), and then at most "
                   + (f"{lib.ENG_TEST_PAUSE_MAX_NS} ns" if name == "test_pause_ns" else
                      f"the known ENG_FAULT_* bits {_FAULT_BITS:#x}"))
    return detail


def _raise_durable(cls: type[EngineError], template: str, code: int, why: str,
                   context: dict[str, Any]) -> NoReturn:
    info = ffi.new("eng_durable_info *")
    lib.eng_durable_refusal(info)
    seen = {"journal_seq": info.journal_seq, "written_seq": info.written_seq,
            "durable_seq": info.durable_seq, "writer_pid": info.writer_pid,
            "failure": abs(info.failure),   # < 0: a write or sync failed (never retried)
            "failure_words": os.strerror(abs(info.failure)) if info.failure else "?"}
    message = template.format_map(_Context({**context, **seen}, code=code, why=why))
    raise cls(message, int(info.durable_seq), int(info.writer_pid), abs(int(info.failure)))


def raise_for(code: int, **context: Any) -> NoReturn:
    """Raise the exception for C status ``code``; ``context`` fills its message."""
    cls, template = ERRORS.get(code, (InternalError, "engine call failed with code {code} ({why})"))
    why = ffi.string(lib.eng_strerror(code)).decode()
    context.setdefault("detail", "")
    if code in (lib.ENG_EJOURNALFULL, lib.ENG_EDURABLE):   # what the refusal saw (this thread)
        _raise_durable(cls, template, code, why, context)
    context = {k: _Shown(shown(v)) if isinstance(v, int) and v.bit_length() > 128 else v
               for k, v in context.items()}
    raise cls(template.format_map(_Context(context, code=code, why=why)))
