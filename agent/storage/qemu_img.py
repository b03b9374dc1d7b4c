"""qemu's tools behind one thin seam: qemu-img for create, info, check and measure; qemu-nbd
started for one worker (agent/storage/qemu_nbd.py).

Every call names the format (`-f`, `-F`, `driver=`): qemu never probes one, so a raw volume
whose guest wrote a qcow2 header into it stays raw. Every tool runs as a child of the worker
with a parent-death signal, so killing the worker (or the agent, whose death kills its
workers) kills the tool too; waiting heartbeats through `beat`. A tool's failure is an agent
error with the tool's own message in data.detail, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from agent import errors, system

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
DRIVERS = {"raw": "raw", "cow": "qcow2"}  # a volume's format -> qemu's driver name
DETAIL_MAX = 2000  # bytes of a tool's message kept in an error


def driver(fmt: str) -> str:
    return DRIVERS[fmt]


def _child_setup(listen_fd: int | None):
    parent = os.getpid()

    def setup() -> None:  # in the child, between fork and exec: async-signal-safe calls only
        system.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:  # the worker died before the signal was armed
            os._exit(1)
        if listen_fd is not None:  # systemd socket activation: the socket is fd 3
            if listen_fd == 3:  # dup2 onto itself keeps close-on-exec
                os.set_inheritable(3, True)
            else:
                os.dup2(listen_fd, 3)
            os.putenv("LISTEN_PID", str(os.getpid()))
            os.putenv("LISTEN_FDS", "1")
    return setup


def start(argv: list[str], listen_fd: int | None = None,
          log_fd: int | None = None) -> subprocess.Popen:
    """Start a tool that dies with this process; `listen_fd` is handed over as fd 3 (the
    worker's other descriptors are all close-on-exec, PEP 446); its output goes to pipes,
    or to `log_fd`."""
    out = subprocess.PIPE if log_fd is None else log_fd
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                close_fds=listen_fd is None,
                                preexec_fn=_child_setup(listen_fd))
    except FileNotFoundError:
        raise errors.OperationFailed(f"{argv[0]} is not installed (Debian: qemu-utils)",
                                     tool=argv[0], reason="missing-tool") from None


def _classify(detail: str) -> str:
    text = detail.lower()
    if "corrupt" in text or "image is not in qcow2 format" in text:
        return "corrupt"
    if "unsupported" in text or "not supported" in text:
        return "unsupported"
    if "backing" in text or "could not open" in text:
        return "chain"
    return "tool-failed"


def tool_error(tool: str, detail: str, **data) -> errors.AgentError:
    detail = detail.strip()[-DETAIL_MAX:]
    if "No space left" in detail:
        return errors.NoSpace(f"{tool}: no space left on device", tool=tool, detail=detail,
                              **data)
    return errors.ImageInvalid(f"{tool} failed: {detail.splitlines()[-1] if detail else '?'}",
                               tool=tool, detail=detail, reason=_classify(detail), **data)


def run(args: list[str], beat=lambda: None, tool: str = QEMU_IMG, ok: tuple = (0,),
        **data) -> str:
    """Run a qemu tool to its end, heartbeating; its stdout, or the named error (an exit
    code outside `ok`)."""
    proc = start([tool, *args])
    try:
        out, err = _wait(proc, beat)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in ok:
        raise tool_error(tool, err or out, exit_code=proc.returncode, **data)
    return out


def _wait(proc: subprocess.Popen, beat) -> tuple[str, str]:
    while True:
        try:
            out, err = proc.communicate(timeout=0.25)
            return out.decode(errors="replace"), err.decode(errors="replace")
        except subprocess.TimeoutExpired:
            beat()


def info(path: str, fmt: str, beat=lambda: None) -> dict:
    """qemu-img info of one image, its backing file NOT opened (what the header says)."""
    return json.loads(run(["info", "--output=json", "-f", driver(fmt), path], beat, path=path))


def create(path: str, fmt: str, size: int, *, backing: str | None = None,
           backing_fmt: str | None = None, preallocation: str = "sparse",
           cluster_size: int | None = None, beat=lambda: None) -> None:
    """A new image. A backing file is named as given (relative: the image's directory) and
    never opened (-u): the chain is the metadata's, checked before anything opens it."""
    opts = ["compat=1.1"] if fmt == "cow" else []
    if preallocation == "preallocated":
        opts.append("preallocation=" + ("metadata" if fmt == "cow" else "falloc"))
    if cluster_size:
        opts.append(f"cluster_size={cluster_size}")
    args = ["create", "-q", "-f", driver(fmt)]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", driver(backing_fmt)]
    run([*args, path, str(size)], beat, path=path)


def check(path: str, fmt: str, repair_leaks: bool = False, beat=lambda: None) -> dict:
    """qemu-img check of a qcow2 (leaked clusters repaired if asked: they are space a killed
    writer allocated and never linked, harmless but wasted). ImageInvalid if corrupt."""
    args = ["check", "--output=json", "-f", driver(fmt)]
    if repair_leaks:
        args += ["-r", "leaks"]
    # Exit 0: clean; 3: leaks only (harmless); 2: corrupt; 1: could not check.
    return json.loads(run([*args, path], beat, ok=(0, 3), path=path) or "{}")


def measure(fmt: str, chain_opts: str, beat=lambda: None) -> dict:
    """What a copy of the image described by `chain_opts` would need in format `fmt`."""
    return json.loads(run(["measure", "--output=json", "-O", driver(fmt), "--image-opts",
                           chain_opts], beat))


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


def wait_gone(proc: subprocess.Popen, seconds: float = 5.0) -> None:
    """Wait for a tool to exit after its client left; kill it if it does not."""
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
