"""qemu's tools behind one thin seam: qemu-img for create, check and measure; qemu-nbd
started for one worker (agent/storage/qemu_nbd.py).

Every call names the format (`-f`, `-F`, `driver=`): qemu never probes one, so a raw volume
whose guest wrote a qcow2 header into it stays raw. No qemu process opens a qcow2 before its
header was read by the agent itself (agent/storage/qcow2.py, through chain.inspect). Every
tool runs as a child of the worker with a parent-death signal, so killing the worker (or the
agent, whose death kills its workers) kills the tool too; waiting heartbeats through `beat`.

Every tool runs under limits, as OpenStack runs `qemu-img info` under prlimit: address space
and CPU time (RLIMIT_AS, RLIMIT_CPU), wall time, and the bytes of output kept (its stdout up
to OUTPUT_MAX, its stderr's last DETAIL_MAX). A tool past one is killed and its failure is
ImageInvalid reason `limits`, which names the limit: an image that needs more fails the same
way every time, and is not retried. A tool's failure is an agent error with the tool's own
message in data.detail (host paths other than the volume's own redacted), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass

from agent import errors, system

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
DRIVERS = {"raw": "raw", "cow": "qcow2"}  # a volume's format -> qemu's driver name
DETAIL_MAX = 2000  # bytes of a tool's message kept in an error
OUTPUT_MAX = 4 << 20  # bytes of a tool's stdout read (JSON of one image: a few KiB)
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """What one run of a tool may take. None: unlimited."""

    address_space: int | None = GiB  # OpenStack's qemu-img info: 1 GiB
    cpu_seconds: int | None = 30  # OpenStack's: 30 s
    wall_seconds: float | None = 120.0


QUERY = Limits()  # info, check, measure: read metadata only
CREATE = Limits(cpu_seconds=600, wall_seconds=None)  # preallocating a 2 TiB qcow2 takes long
SERVER = Limits(address_space=2 * GiB, cpu_seconds=None, wall_seconds=None)  # qemu-nbd


def driver(fmt: str) -> str:
    return DRIVERS[fmt]


def _child_setup(listen_fd: int | None, limits: Limits):
    parent = os.getpid()

    def setup() -> None:  # in the child, between fork and exec
        system.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the signal was armed
            os._exit(1)
        system.keep_buffers_on_heap()
        if limits.address_space:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space,) * 2)
            # glibc reserves 64 MiB of address space for each thread's malloc arena: a
            # tool whose I/O thread pool grows on a busy host (measured: qemu-img bitmap
            # --merge) ran out of its limit creating threads, not using memory.
            os.putenv("MALLOC_ARENA_MAX", "2")
        if limits.cpu_seconds:  # SIGXCPU at the soft limit, SIGKILL a second later
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds,
                                                     limits.cpu_seconds + 1))
        if listen_fd is not None:  # systemd socket activation: the socket is fd 3
            if listen_fd == 3:  # dup2 onto itself keeps close-on-exec
                os.set_inheritable(3, True)
            else:
                os.dup2(listen_fd, 3)
            os.putenv("LISTEN_PID", str(os.getpid()))
            os.putenv("LISTEN_FDS", "1")
    return setup


def start(argv: list[str], listen_fd: int | None = None, log_fd: int | None = None,
          limits: Limits = QUERY) -> subprocess.Popen:
    """Start a tool that dies with this process, under `limits`; `listen_fd` is handed over
    as fd 3 (the worker's other descriptors are all close-on-exec, PEP 446); its output goes
    to pipes, or to `log_fd`."""
    out = subprocess.PIPE if log_fd is None else log_fd
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                close_fds=listen_fd is None,
                                preexec_fn=_child_setup(listen_fd, limits))
    except FileNotFoundError:
        raise errors.OperationFailed(f"{argv[0]} is not installed (Debian: qemu-utils)",
                                     tool=argv[0], reason="missing-tool") from None


_QUOTED_PATH = re.compile(r"'(/[^']*)'|\"(/[^\"]*)\"")


def redact(detail: str, own: tuple[str, ...] = ()) -> str:
    """A tool's message without the host paths it quotes, but the volume's own: what an
    image names must not tell its uploader which host files exist."""
    def keep(m):
        path = m.group(1) or m.group(2)
        return m.group(0) if path in own else "'<path>'"
    return _QUOTED_PATH.sub(keep, detail)


def tool_error(tool: str, detail: str, *, reason: str = "tool-failed", own=(),
               **data) -> errors.AgentError:
    """A tool's failure, named: NoSpace for a full disk, VolumeInUse (reason open) when
    qemu's image lock is held by another process, else ImageInvalid with `reason` (what the
    caller checked: never a guess from the tool's words)."""
    detail = redact(detail.strip()[-DETAIL_MAX:], tuple(own))
    if "No space left" in detail:
        return errors.NoSpace(f"{tool}: no space left on device", tool=tool, detail=detail,
                              **data)
    if "Failed to get" in detail and "lock" in detail:  # qemu's image locks: not the image's fault
        return errors.VolumeInUse(f"{tool}: another process has the image open (a guest, "
                                  f"an export)", tool=tool, detail=detail, reason="open",
                                  **data)
    return errors.ImageInvalid(f"{tool} failed: {detail.splitlines()[-1] if detail else '?'}",
                               tool=tool, detail=detail, reason=reason, **data)


class LimitExceeded(Exception):
    def __init__(self, limit: str):
        super().__init__(limit)
        self.limit = limit


def run(args: list[str], beat=lambda: None, tool: str = QEMU_IMG, ok: tuple = (0,),
        limits: Limits = QUERY, path: str | None = None, **data) -> str:
    """Run a qemu tool to its end under `limits`, heartbeating; its stdout, or the named
    error (an exit code outside `ok`; ImageInvalid reason limits past a limit)."""
    proc = start([tool, *args], limits=limits)
    own = (path,) if path else ()
    try:
        out, err = _wait(proc, beat, limits)
    except LimitExceeded as exc:
        raise _over(tool, exc.limit, limits, path) from None
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):  # a tool cut off left them open
            pipe.close()
    if proc.returncode == -signal.SIGXCPU and limits.cpu_seconds:
        raise _over(tool, "cpu", limits, path)
    if proc.returncode not in ok:
        if limits.address_space and ("annot allocate memory" in err or
                                     "ailed to allocate" in err or
                                     proc.returncode == -signal.SIGABRT):
            raise _over(tool, "memory", limits, path)
        raise tool_error(tool, err or out, own=own, exit_code=proc.returncode,
                         **({"path": path} if path else {}), **data)
    return out


def _over(tool: str, limit: str, limits: Limits, path: str | None) -> errors.ImageInvalid:
    allowed = {"memory": limits.address_space, "cpu": limits.cpu_seconds,
               "wall": limits.wall_seconds, "output": OUTPUT_MAX}[limit]
    return errors.ImageInvalid(f"{tool} needed more than its {limit} limit ({allowed}) for "
                               f"this image", tool=tool, reason="limits", limit=limit,
                               allowed=allowed, **({"path": path} if path else {}))


def _wait(proc: subprocess.Popen, beat, limits: Limits) -> tuple[str, str]:
    """Read the tool's stdout (up to OUTPUT_MAX) and the tail of its stderr until it exits,
    heartbeating; LimitExceeded past OUTPUT_MAX or the wall time."""
    deadline = None if limits.wall_seconds is None else time.monotonic() + limits.wall_seconds
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            for key, _ in sel.select(0.25):
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is err and len(err) > 4 * DETAIL_MAX:
                    del err[:-DETAIL_MAX]
                elif key.data is out and len(out) > OUTPUT_MAX:
                    raise LimitExceeded("output")
            if deadline is not None and time.monotonic() > deadline:
                raise LimitExceeded("wall")
            beat()
    return out.decode(errors="replace"), err.decode(errors="replace")


def create(path: str, fmt: str, size: int, *, backing: str | None = None,
           backing_fmt: str | None = None, preallocation: str = "sparse",
           cluster_size: int | None = None, extended_l2: bool = False,
           beat=lambda: None) -> None:
    """A new image. A backing file is named as given (relative: the image's directory) and
    never opened (-u): the chain is the metadata's, checked before anything opens it."""
    opts = ["compat=1.1"] if fmt == "cow" else []
    if preallocation == "preallocated":
        opts.append("preallocation=" + ("metadata" if fmt == "cow" else "falloc"))
    if cluster_size:
        opts.append(f"cluster_size={cluster_size}")
    if extended_l2:
        opts.append("extended_l2=on")
    args = ["create", "-q", "-f", driver(fmt)]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", driver(backing_fmt)]
    run([*args, path, str(size)], beat, limits=CREATE, path=path)


def check(image_opts: str, path: str, repair_leaks: bool = False, beat=lambda: None) -> dict:
    """qemu-img check of one qcow2 layer (its backing not opened: `image_opts` says so), leaked
    clusters repaired if asked (space a killed writer allocated and never linked: harmless
    but wasted). ImageInvalid reason corrupt if qemu finds it damaged: clusters past the
    file's end (a cut upload), tables that disagree."""
    args = ["check", "--output=json", "--image-opts"]
    if repair_leaks:
        args += ["-r", "leaks"]
    # Exit 0: clean; 3: leaks only (harmless); 2: corrupt; 1: could not check.
    out = run([*args, image_opts], beat, ok=(0, 2, 3), path=path)
    try:
        report = json.loads(out or "{}")
    except ValueError:
        raise tool_error(QEMU_IMG, out, reason="corrupt", own=(path,), path=path) from None
    damaged = report.get("corruptions", 0) + report.get("check-errors", 0)
    if damaged:
        raise errors.ImageInvalid("qemu-img check found the image damaged", tool=QEMU_IMG,
                                  reason="corrupt", path=path,
                                  corruptions=report.get("corruptions", 0),
                                  check_errors=report.get("check-errors", 0))
    return report


def measure(fmt: str, chain_opts: str, beat=lambda: None) -> dict:
    """What a copy of the image described by `chain_opts` would need in format `fmt`."""
    return json.loads(run(["measure", "--output=json", "-O", driver(fmt), "--image-opts",
                           chain_opts], beat) or "{}")


def resize(image_opts: str, size: int, path: str, *, shrink: bool = False,
           preallocation: str = "sparse", beat=lambda: None) -> None:
    """The image's virtual size made `size` (one layer: `image_opts` opens no backing)."""
    args = ["resize", "-q", "--image-opts"]
    if shrink:
        args.append("--shrink")
    if preallocation == "preallocated":
        args.append("--preallocation=metadata")
    run([*args, image_opts, str(size)], beat, limits=CREATE, path=path)


def rebase_unsafe(path: str, backing: str, backing_fmt: str, beat=lambda: None) -> None:
    """A qcow2's header names another backing file (-u: only the header is written, no
    data and no backing opened; the caller knows the new backing reads the same)."""
    run(["rebase", "-q", "-u", "-f", driver("cow"), "-b", backing, "-F", driver(backing_fmt),
         path], beat, path=path)


LOCK_WAIT_SECONDS = 10.0  # a killed writer's qemu letting go of the image's lock
LOCK_POLL_SECONDS = 0.2


def lock_waited(fn, pause, on_wait=lambda: None, seconds: float = LOCK_WAIT_SECONDS):
    """fn(), again while another process holds the image's lock (VolumeInUse, reason open),
    for up to `seconds`; `on_wait()` once, when it first waits; `pause(s)` between tries (a
    worker's ctx.wait: heartbeats, and stops when asked).

    A writer SIGKILLed with its worker (a copy's or an export's qemu-nbd) keeps its image's
    descriptors, and so qemu's lock, while a thread of it finishes its I/O, after its main
    thread is gone: whoever takes the image up next waits that out instead of failing."""
    deadline, told = time.monotonic() + seconds, False
    while True:
        try:
            return fn()
        except errors.VolumeInUse as exc:
            if exc.data.get("reason") != "open" or time.monotonic() >= deadline:
                raise
        if not told:
            on_wait()
            told = True
        pause(LOCK_POLL_SECONDS)


def direct_io(path: str) -> bool:
    """Whether the file system under `path` takes O_DIRECT (tmpfs does not): qemu then
    bypasses the host page cache, as VDSM's copies do."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def escape(value: str) -> str:
    return value.replace(",", ",,")


def exited(proc: subprocess.Popen, seconds: float) -> bool:
    """Whether a tool has exited within `seconds`, woken the moment it does (its pidfd):
    Popen.wait with a timeout polls in sleeps that grow to 50 ms, and a copy waits for a
    qemu-nbd or two to exit before it is done (docs/performance.md)."""
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # gone and reaped meanwhile, or a kernel without pidfds
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            return False
        return True
    try:
        waiter = select.poll()
        waiter.register(fd, select.POLLIN)
        waiter.poll(max(0.0, seconds) * 1000)
    finally:
        os.close(fd)
    return proc.poll() is not None


def wait_gone(proc: subprocess.Popen, seconds: float = 5.0) -> None:
    """Wait for a tool to exit after its client left; kill it if it does not."""
    if not exited(proc, seconds):
        proc.kill()
        proc.wait()
