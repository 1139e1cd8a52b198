"""Errors raised by codecs on bad input. The connection that sent it is closed; others go on."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow."""


class FrameTooLong(ProtocolError):
    """A frame or line exceeds the protocol's limit (or announces that it will)."""


class MalformedFrame(ProtocolError):
    """Framing is broken: a bad length, a missing terminator, binary garbage."""


class BadRequest(ProtocolError):
    """The frame is well formed but its content is not a valid request."""
