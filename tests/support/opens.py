"""Who opened a file: inotify's IN_OPEN, through libc (no package for a few lines). The
oracle of the hostile-image tests: a file an image names must never be opened by anyone."""

from __future__ import annotations

import ctypes
import os
import struct

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_libc = ctypes.CDLL(None, use_errno=True)


class Opens:
    """Counts every open of the watched files from now on (any process, any mode)."""

    def __init__(self, *paths: str):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.names = {}
        for p in paths:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(p), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {p}")
            self.names[wd] = p

    def seen(self) -> list[str]:
        """The watched files opened since the last call (one entry per open)."""
        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                offset += 16 + length
                if mask & IN_OPEN:
                    out.append(self.names.get(wd, "?"))

    def close(self) -> None:
        os.close(self.fd)
