"""Multiprocess shared-memory state engine.

>>> from engine import Engine, Trigger
>>> with Engine.create(capacity=16) as eng:
...     pos = eng.open_position(entry_price=100.0, amount=2.0, side=1, token=7)
...     eng.transition(pos, Trigger.POSITION_OPENED).name
...     eng.unlink()
'APPLIED'
"""

from engine.accounts import Account
from engine.core import Engine, Handle, RecoveryReport
from engine.errors import (
    ArgumentError,
    BusyError,
    CapacityError,
    ClosedError,
    DurabilityError,
    EngineError,
    EngineTypeError,
    FieldError,
    InternalError,
    JournalFullError,
    JournalLappedError,
    KeyExistsError,
    KeyLimitError,
    MissingExtraError,
    MoneyError,
    NotOpenError,
    PriceError,
    RestoreError,
    RiskLimitError,
    SegmentError,
    SegmentNotFoundError,
    ServerError,
    SlotError,
    SpecError,
    SpecMismatchError,
    StaleAccountError,
    StaleIdError,
    TriggerError,
    UnknownAccountError,
    WaitTimeout,
)
from engine.journal import Event
from engine.metrics import Metrics, OpMetrics
from engine.records import Context, PriceSnapshot
from engine.spec import (
    ORDER_SPEC,
    POSITION_SPEC,
    ExitReason,
    MachineSpec,
    Outcome,
    Rule,
    Side,
    State,
    Trigger,
    TriggerName,
)

__all__ = [
    "ORDER_SPEC",
    "POSITION_SPEC",
    "Account",
    "ArgumentError",
    "BusyError",
    "CapacityError",
    "ClosedError",
    "Context",
    "DurabilityError",
    "Engine",
    "EngineError",
    "EngineTypeError",
    "Event",
    "ExitReason",
    "FieldError",
    "Handle",
    "InternalError",
    "JournalFullError",
    "JournalLappedError",
    "KeyExistsError",
    "KeyLimitError",
    "MachineSpec",
    "Metrics",
    "MissingExtraError",
    "MoneyError",
    "NotOpenError",
    "OpMetrics",
    "Outcome",
    "PriceError",
    "PriceSnapshot",
    "RecoveryReport",
    "RestoreError",
    "RiskLimitError",
    "Rule",
    "SegmentError",
    "SegmentNotFoundError",
    "ServerError",
    "Side",
    "SlotError",
    "SpecError",
    "SpecMismatchError",
    "StaleAccountError",
    "StaleIdError",
    "State",
    "Trigger",
    "TriggerError",
    "TriggerName",
    "UnknownAccountError",
    "WaitTimeout",
]
__version__ = "0.1.0"
