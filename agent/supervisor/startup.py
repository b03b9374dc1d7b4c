"""Start-up work derived from what the agent finds, before it reports ready.

Every attached domain (from the config, or attached by RPC in an earlier life) is scanned
for copy markers, and the recovery policy is applied to each (agent/supervisor/recovery.py). Until
every scan has ended, requests are answered 99 RecoveryInProgress.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from typing import TYPE_CHECKING

import psutil
import zmq

from agent.supervisor import recovery
from agent.system import write_atomic
from agent.wire import transport
from workers import protocol

if TYPE_CHECKING:  # the loop's object, passed to every function of this module
    from agent.supervisor.loop import Supervisor


class StartupError(Exception):
    pass


def claim_run_dir(run_dir) -> int:
    """The run dir made and locked for life (the lock freed by the kernel at death): two
    agents never share a run dir, so the stale ipc sockets and workers start-up cleans up
    are never a live agent's. A run dir the OS refuses (full, read-only, not a directory)
    is a StartupError that names it: a line for the operator, not a traceback."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(run_dir / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use the run dir {run_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another agent is running on {run_dir}") from None
    return fd


def write_endpoints(run_dir, endpoints: dict) -> None:
    """RUN_DIR/endpoints.json, where the command line and an operator find this agent. One
    that cannot be written (the run dir's file system full) ends start-up by name."""
    try:
        write_atomic(run_dir / "endpoints.json", endpoints)
    except OSError as exc:
        raise StartupError(f"cannot write {run_dir / 'endpoints.json'}: {exc.strerror or exc}") \
            from None


def kill_leftover_workers(run_dir, log) -> None:
    """Workers of an earlier life should have died with it; kill any that did not."""
    marker = str(run_dir)
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "workers.forkserver" in cmd and marker in cmd and p.pid != os.getpid():
            found.append(p)
    for p in found:
        log.warning("killing_leftover_worker", worker_pid=p.pid)
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(found, timeout=5)


def sweep_exports(run_dir, log) -> int:
    """Remove the export directories (socket, qemu-nbd's log) of workers and scrubs that
    are gone: a killed worker cannot remove its own. A live process's is left alone (a
    scrub outlives the agent that started it). How many were removed."""
    base = protocol.exports_dir(run_dir)
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(base):
            pid = name.split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                continue
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed += 1
    if removed:
        log.info("exports_swept", removed=removed)
    return removed


def _alive(pid: int) -> bool:
    """A process that runs: a zombie (a killed worker its new parent has yet to reap, or
    never will) left its export behind like a dead one."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def rpc_socket(ctx: zmq.Context, rcfg: dict, guard) -> tuple[zmq.Socket, list[str]]:
    """The RPC ROUTER, bound: its frames bounded (max_message_bytes), and a client that does
    not read holding at most max_queued_replies replies (one more is dropped and counted:
    ROUTER_MANDATORY makes a full queue an error we see, not a silence)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, rcfg["max_message_bytes"])
    sock.setsockopt(zmq.SNDHWM, rcfg["max_queued_replies"])
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if guard:
        guard.protect(sock)
    return sock, transport.bind_all(sock, rcfg["endpoints"])


def begin(agent: Supervisor) -> None:
    """Each attached domain: join its lockspace (sanlock), and scan its copy markers. With
    sanlock the scan waits, pending, for the join, and READY does not wait for it."""
    for domain_id in list(agent.domains.paths):
        agent.lockspaces.join(agent, domain_id)
        recovery.scan(agent, domain_id, startup=not agent.lockspaces.needed)
