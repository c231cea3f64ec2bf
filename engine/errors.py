"""Exceptions.  C returns status codes; each maps to one class here.

``EngineError`` is the base and is never raised itself.  Each subclass also
inherits the builtin a caller would naturally catch (``SlotError`` is an
``IndexError``, ``PriceError`` a ``ValueError``, ...).
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises (never raised itself)."""


class SlotError(EngineError, IndexError):
    """A slot id out of range."""


class NotOpenError(SlotError):
    """A slot that was never opened, or was released."""


class EngineTypeError(EngineError, TypeError):
    """An argument of the wrong type (slot, trigger, price, array dtype)."""


class PriceError(EngineError, ValueError):
    """A price that is NaN, infinite, zero or negative."""


class TriggerError(EngineError, ValueError):
    """A trigger the engine's machine spec does not have."""


class ArgumentError(EngineError, ValueError):
    """Any other argument out of its allowed range."""


class CapacityError(EngineError, MemoryError):
    """No free slot, or no free entry in the process registry."""


class BusyError(EngineError, TimeoutError):
    """A live writer held a record past the bound; nothing was changed."""


class WaitTimeout(EngineError, TimeoutError):
    """``wait_for_change`` saw no change before its timeout."""


class SegmentError(EngineError, OSError):
    """A segment that cannot be created or attached (foreign, corrupt, ...)."""


class SegmentNotFoundError(SegmentError, FileNotFoundError):
    """No segment of that name exists."""


class SpecMismatchError(SegmentError):
    """The segment runs another machine spec than the one given."""


class SpecError(EngineError, ValueError):
    """A machine spec that is not well formed."""


class ClosedError(EngineError, RuntimeError):
    """The Engine was closed."""
