"""Moving a disk's guest view between a local file and an agent's export, over NBD.

Both ends are libnbd handles: the export's unix socket (Export.start), and a private
qemu-nbd of the local file, its format given (raw or qcow2: never probed), which dies with
this process. The work is cut in 4 MiB blocks, the block of the agent's checksums; each
block's extents come from NBD block status, so zeros and holes are never sent: on a fresh
destination a zero range is left alone, on one that may hold something else it becomes a
write-zeroes. Each block's BLAKE3 digest is taken as it passes, so a transfer ends knowing
the blake3-4m checksum the agent records, and the agent's finish checks it. A resumed
transfer compares both ends' block digests (the agent's from Image.checksum, computed on its
side) and moves only the blocks that differ. Several connections move blocks at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import blake3

BLOCK = 4 << 20
STATUS_MAX = 1 << 30
# Each connection flushes its writes this often: unflushed writes (a qcow2's tables in
# qemu-nbd's cache) die with a killed agent, and a resume sends again what they held.
FLUSH_SECONDS = 0.5
DRIVERS = {"raw": "raw", "qcow2": "qcow2"}
QCOW2_MAGIC = b"QFI\xfb"
_ZEROS = memoryview(bytes(BLOCK))


def nbd_module():
    try:
        import nbd
    except ImportError:
        raise RuntimeError("libnbd's Python binding is missing (Debian: python3-libnbd, "
                           "seen by a venv made with --system-site-packages)") from None
    return nbd


@functools.lru_cache(maxsize=8)
def zero_digest(n: int) -> bytes:
    return blake3.blake3(_ZEROS[:n]).digest()


def checksum(digests: list[bytes]) -> str:
    """The blake3-4m checksum of a guest view whose blocks have these digests."""
    return "blake3-4m:" + blake3.blake3(b"".join(digests)).hexdigest()


def is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def _die_with_parent() -> None:  # in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NbdHandle:
    """One NBD connection (libnbd), as run_blocks uses an end."""

    def __init__(self, h):
        self.h = h

    def size(self) -> int:
        return self.h.get_size()

    def extents(self, start: int, end: int):
        """(offset, length, zero) covering [start, end), from block status (zero: reads as
        zeros, a hole or written zeros)."""
        offset = start
        while offset < end:
            found, before = [], offset

            def got(context, at, entries, err):
                if context == "base:allocation":
                    pos = at
                    for i in range(0, len(entries), 2):
                        found.append((pos, entries[i], bool(entries[i + 1] & 2)))
                        pos += entries[i]
                return 0
            self.h.block_status(min(end - offset, STATUS_MAX), offset, got)
            if not found:  # no answer: read it all
                found = [(offset, end - offset, False)]
            for at, length, zero in found:
                length = min(length, end - at)
                if length > 0:
                    yield at, length, zero
                    offset = at + length
            if offset <= before:  # an answer that covers nothing would loop for ever
                raise RuntimeError("block status covers nothing")

    def pread(self, n: int, offset: int) -> bytes:
        return self.h.pread(n, offset)

    def pwrite(self, data, offset: int) -> None:
        self.h.pwrite(data, offset)

    def zero(self, n: int, offset: int) -> None:
        self.h.zero(n, offset)

    def flush(self) -> None:
        self.h.flush()

    def shutdown(self) -> None:
        self.h.shutdown()


class FileHandle:
    """A local raw file read and written by the kernel itself (no qemu-nbd between: a
    raw file's guest view is its bytes); holes found with SEEK_DATA and made by punching."""

    _libc = None

    def __init__(self, path: str, writable: bool):
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def extents(self, start: int, end: int):
        offset = start
        while offset < end:
            try:
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole to the end
                data = end
            data = min(data, end)
            if data > offset:
                yield offset, data - offset, True
            if data >= end:
                return
            stop = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data, stop - data, False
            offset = stop

    def pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        while len(data) < n:
            more = os.pread(self.fd, n - len(data), offset + len(data))
            if not more:
                return data + bytes(n - len(data))  # past the end: the guest reads zeros
            data += more
        return data

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, n: int, offset: int) -> None:
        if FileHandle._libc is None:
            FileHandle._libc = ctypes.CDLL(None, use_errno=True)
            FileHandle._libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_int64, ctypes.c_int64]
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: zeros that take no room
        if FileHandle._libc.fallocate(self.fd, 0x02 | 0x01, offset, n) != 0:
            for at in range(offset, offset + n, BLOCK):  # no hole punching here: zeros
                self.pwrite(_ZEROS[:min(BLOCK, offset + n - at)], at)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def shutdown(self) -> None:
        os.close(self.fd)


class Local:
    """A local file's guest view: a raw file read and written directly (FileHandle), a
    qcow2 through a private qemu-nbd (read-only, or writable) on a socket in a fresh 0700
    directory, SIGKILLed if this process dies."""

    def __init__(self, path: str, fmt: str, writable: bool = False):
        self.path, self.fmt, self.writable = path, fmt, writable
        self.proc = self.dir = None
        if fmt != "raw":
            self._start()

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hostagent-local-")
        self.socket = os.path.join(self.dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket)
            listener.listen(16)
            argv = ["qemu-nbd", "--persistent", "--shared=16", "-f", DRIVERS[self.fmt],
                    "--discard=unmap" if self.writable else "--read-only", self.path]
            fd = listener.fileno()

            def setup():  # systemd socket activation: the listener is fd 3
                _die_with_parent()
                if fd == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(fd, 3)
                os.putenv("LISTEN_PID", str(os.getpid()))
                os.putenv("LISTEN_FDS", "1")
            # Every other descriptor of ours is close-on-exec (PEP 446): fd 3 must survive.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         close_fds=False, preexec_fn=setup)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            listener.close()

    def connect(self):
        if self.proc is None:
            return FileHandle(self.path, self.writable)
        nbd = nbd_module()
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_unix(self.socket)
        except nbd.Error as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() \
                is not None else ""
            raise RuntimeError(f"qemu-nbd of {self.path}: {err.strip() or exc}") from None
        return NbdHandle(h)

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # flushes a writable image, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_export(socket_path: str) -> NbdHandle:
    nbd = nbd_module()
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(socket_path)
    return NbdHandle(h)


def blocks(h, size: int, wanted: set[int] | None = None):
    """(index, [(offset, length, zero), ...]) for each 4 MiB block (of `wanted` only) of the
    handle's guest view."""
    current, pieces = 0, []
    for at, length, zero in h.extents(0, size):
        while length:
            index = at // BLOCK
            if index != current:
                if pieces and (wanted is None or current in wanted):
                    yield current, pieces
                current, pieces = index, []
            n = min(length, (index + 1) * BLOCK - at)
            pieces.append((at, n, zero))
            at, length = at + n, length - n
    if pieces and (wanted is None or current in wanted):
        yield current, pieces


@dataclass
class Stats:
    """Bytes moved: read (data read from the source), sent (data written to the
    destination), zeroed (write-zeroes asked of it), skipped (blocks both ends held)."""

    read: int = 0
    sent: int = 0
    zeroed: int = 0
    skipped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"read": self.read, "sent": self.sent, "zeroed": self.zeroed,
                "skipped": self.skipped}


class Pacer:
    """At most `rate` bytes a second over all threads (0: unlimited)."""

    def __init__(self, rate: int = 0):
        self.rate, self.began, self.done = rate, time.monotonic(), 0
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self.lock:
            self.done += n
            due = self.began + self.done / self.rate
        ahead = due - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class _Movers:
    """`threads` threads, each with its own connections, taking blocks from a queue; the
    first failure stops them all (every one still takes its end marker)."""

    def __init__(self, src_connect, dst_connect, fresh: bool, stats: Stats, pacer: Pacer,
                 on_block, threads: int):
        self.src_connect, self.dst_connect, self.fresh = src_connect, dst_connect, fresh
        self.stats, self.pacer, self.on_block = stats, pacer, on_block
        self.work: queue.Queue = queue.Queue(maxsize=threads * 2)
        self.digests: dict[int, bytes] = {}
        self.failures: list[BaseException] = []
        self.pool = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.pool:
            t.start()

    def _run(self) -> None:
        src = dst = None
        try:
            src = self.src_connect()
            dst = self.dst_connect() if self.dst_connect else None
        except BaseException as exc:
            self.failures.append(exc)
        flushed = time.monotonic()
        while (item := self.work.get()) is not None:  # taken to the end, failed or not
            if self.failures:
                continue
            try:
                index, pieces = item
                self.digests[index] = _block(src, dst, pieces, self.fresh, self.stats,
                                             self.pacer)
                if dst is not None and time.monotonic() - flushed >= FLUSH_SECONDS:
                    dst.flush()  # what a crash of the far end keeps: a resume skips it
                    flushed = time.monotonic()
                if self.on_block is not None:
                    self.on_block(index, sum(p[1] for p in pieces))
            except BaseException as exc:
                self.failures.append(exc)
        try:
            if dst is not None and not self.failures:
                dst.flush()
        except BaseException as exc:
            self.failures.append(exc)
        for h in (src, dst):
            if h is not None:
                with contextlib.suppress(Exception):
                    h.shutdown()

    def join(self) -> None:
        for _ in self.pool:
            self.work.put(None)
        for t in self.pool:
            t.join()
        if self.failures:
            raise self.failures[0]


def run_blocks(src_connect, dst_connect, size: int, *, fresh: bool,
               wanted: set[int] | None = None, threads: int = 4, on_block=None,
               stats: Stats | None = None, should_stop=lambda: False,
               rate: int = 0) -> dict[int, bytes]:
    """Move (or, without `dst_connect`, only hash) the blocks of the source's guest view
    (those in `wanted`, else all); returns each block's digest by index. `on_block(index,
    length)` after each; at most `rate` bytes of data a second. Every destination
    connection is flushed every FLUSH_SECONDS and at its end."""
    movers = _Movers(src_connect, dst_connect, fresh, stats or Stats(), Pacer(rate),
                     on_block, threads)
    try:
        head = src_connect()
        try:
            for item in blocks(head, size, wanted):
                if movers.failures or should_stop():
                    break
                movers.work.put(item)
        finally:
            head.shutdown()
    finally:
        movers.join()
    if should_stop():
        raise KeyboardInterrupt
    return movers.digests


def _block(src, dst, pieces, fresh: bool, stats: Stats, pacer: Pacer) -> bytes:
    if all(zero for _, _, zero in pieces):
        length = sum(p[1] for p in pieces)
        if dst is not None and not fresh:
            dst.zero(length, pieces[0][0])
            stats.add(zeroed=length)
        return zero_digest(length)
    h = blake3.blake3()
    for at, length, zero in pieces:
        if zero:
            h.update(_ZEROS[:length])
            if dst is not None and not fresh:
                dst.zero(length, at)
                stats.add(zeroed=length)
            continue
        pacer.take(length)
        data = src.pread(length, at)
        stats.add(read=length)
        h.update(data)
        if dst is not None:
            dst.pwrite(data, at)
            stats.add(sent=length)
    return h.digest()


def differing(local: dict[int, bytes], remote: dict[int, bytes], count: int) -> set[int]:
    """The block indices whose digests differ between the two ends (or are missing)."""
    return {i for i in range(count) if local.get(i) is None or local.get(i) != remote.get(i)}


def block_count(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK
