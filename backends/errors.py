"""The two ways a directory operation can fail, as opposed to answering "not found"."""

from __future__ import annotations


class DirectoryError(Exception):
    """Base of directory failures. The message is shown to operators: never put a secret in it."""


class TemporaryFailure(DirectoryError):
    """The backend could not answer now (down, timed out, pool exhausted).

    Never turned into "not found": Postfix would bounce mail and Dovecot would reject a valid user.
    Every protocol reports it as its own "try again later".
    """


class PermanentFailure(DirectoryError):
    """The directory cannot answer this request as configured (misconfiguration, unsupported request)."""
