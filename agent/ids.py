"""Identifiers that end up in file names.

Every domain, image and volume id becomes part of a path, so this is the one gate that keeps
``../``, NUL bytes, absolute paths and look-alike spellings out of the file system: only the
canonical 36-character UUID form passes, and it comes back lowercase so two spellings of one
id can never name two files.
"""

from __future__ import annotations

import uuid

from agent.errors import InvalidParams

_ALLOWED = frozenset("0123456789abcdef-")


def check_uuid(value, field: str) -> str:
    """Return ``value`` lowercased if it is a canonical UUID, else raise InvalidParams."""
    if isinstance(value, str) and len(value) == 36:
        lowered = value.lower()
        # The character check comes first: uuid.UUID alone also accepts braces, "urn:uuid:"
        # and missing dashes, none of which we want to see in a path.
        if set(lowered) <= _ALLOWED:
            try:
                if str(uuid.UUID(lowered)) == lowered:
                    return lowered
            except ValueError:
                pass
    raise InvalidParams(f"{field} must be a UUID", field=field)
