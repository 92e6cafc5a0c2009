"""CLI layer: making untrusted text safe to print. Key files, envelopes and error messages carry
strings from other peers; escaping control characters keeps one value on one line and keeps
escape sequences away from the terminal. No dependencies, so ``main`` can use it cheaply."""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``, ``\\u202e``)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
