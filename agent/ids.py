"""Identifiers that end up in file names.

Every domain, image and volume id becomes part of a path, so this is the one gate that keeps
``../``, NUL bytes, absolute paths and look-alike spellings out of the file system: only the
canonical 36-character UUID form passes, and it comes back lowercase so two spellings of one
id can never name two files.
"""

from __future__ import annotations

import re
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


# A dirty bitmap's name: it is handed to qemu-img and written into a qcow2, so only a plain
# word passes (a checkpoint's UUID fits), never an option or a path.
_BITMAP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}")


def checked_bitmap_name(value) -> str:
    """A Param check: ValueError unless `value` is a bitmap name that passes."""
    if not isinstance(value, str) or not _BITMAP_NAME.fullmatch(value):
        raise ValueError("must be 1..128 of A-Z a-z 0-9 . _ : + - (not starting with a mark)")
    return value
