"""The one exception tree of fednode. Every layer raises these; foreign exceptions are translated
at the adapter that meets them (``raise X(...) from exc``).

::

    FednodeError
    ├── WireError                  bytes that are not a valid fednode message (remote's fault)
    ├── CryptoError
    │   ├── BadSignatureError      envelope signature, domain or signer does not verify
    │   └── KeyFileError           key file missing, unreadable, malformed or too permissive
    ├── ProtocolError
    │   ├── LocalProtocolError     we asked a state machine for something it cannot do (our bug)
    │   └── RemoteProtocolError    a peer broke the protocol (log, score, carry on)
    ├── TransportError             a stream or connection failed, timed out or was refused
    │   └── TransferError          a blob transfer was refused, truncated or did not verify
    ├── AggregationError           incompatible updates (shapes, dtypes, zero weight)
    └── ConfigError                bad configuration or command-line input

A misbehaving peer is an event to log and score, never a crash: code that handles network input
catches ``WireError``, ``CryptoError``, ``RemoteProtocolError`` and ``TransportError``. A
``LocalProtocolError`` is a bug and fails loudly. The CLI maps each class to an exit code
(:data:`EXIT_CODES`) and prints one line.
"""

from __future__ import annotations


class FednodeError(Exception):
    """Root of every error fednode raises on purpose."""


class WireError(FednodeError):
    """Bytes that do not decode to a valid message.

    Attributes:
        reason: what was wrong, in a few words.
        path: where in the message (``"tensors[3].shape"``), or ``""`` for the frame itself.
    """

    def __init__(self, reason: str, path: str = "") -> None:
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path else reason)


class CryptoError(FednodeError):
    """A key or signature problem."""


class BadSignatureError(CryptoError):
    """A signature does not verify: tampered payload, wrong domain or wrong key."""


class KeyFileError(CryptoError):
    """A key file cannot be used (missing, malformed, wrong permissions, refuses overwrite)."""


class ProtocolError(FednodeError):
    """A protocol state machine rejected an event."""


class LocalProtocolError(ProtocolError):
    """We did something the protocol does not allow: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """A peer did something the protocol does not allow."""


class TransportError(FednodeError):
    """A connection or stream failed, timed out or was refused."""


class TransferError(TransportError):
    """A blob or update transfer was refused, cut short, or did not verify."""


class AggregationError(FednodeError):
    """Updates that cannot be aggregated together."""


class ConfigError(FednodeError):
    """Invalid configuration or command-line input."""


#: Process exit code for each error class, most specific first (the CLI walks this in order).
EXIT_CODES: tuple[tuple[type[FednodeError], int], ...] = (
    (ConfigError, 2),
    (WireError, 3),
    (BadSignatureError, 4),
    (KeyFileError, 5),
    (CryptoError, 4),
    (TransportError, 6),
    (ProtocolError, 7),
    (AggregationError, 8),
    (FednodeError, 1),
)


def exit_code_for(exc: FednodeError) -> int:
    """The CLI exit code for ``exc``."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1
