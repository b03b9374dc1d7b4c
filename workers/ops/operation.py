"""Operations that outlive tasks, seen from a worker: start a scrub, read statuses, stop one.

startScrub's worker takes the domain's scrub lease, registers the operation (one
transaction), launches the scrub process (workers/scrubber.py) with a descriptor of the lease,
waits until that process says it runs (a byte on a pipe, written once its row is STARTED),
and answers. The worker then ends and its own descriptor closes; the scrub's keeps the lock.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time

from agent import errors, logs
from agent.storage import operations
from agent.storage.leases import local
from agent.storage.volumes import open_domain
from workers.ops.volume import holder
from workers.protocol import EVENT_IDENTITY_ENV

READY_TIMEOUT = 30.0  # a scrub process that has not said it runs by then is killed
# What the agent's service manager gave it, and no business of a process that outlives it.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS",
                "LISTEN_FDNAMES")


def launchers(mode: str, env=os.environ) -> list[str]:
    """How to start the scrub so that it outlives the agent, in order of preference.

    Under systemd (INVOCATION_ID set, systemd-run installed) the agent's unit is stopped by
    killing its whole cgroup (KillMode=control-group), which a plain child would be part of:
    there the scrub runs in a transient scope of its own. Anywhere else a child in a new
    session is enough. "auto" falls back to a plain child if systemd-run fails.
    """
    if mode == "spawn":
        return ["spawn"]
    if mode == "systemd-run":
        return ["systemd-run"]
    if env.get("INVOCATION_ID") and shutil.which("systemd-run"):
        return ["systemd-run", "spawn"]
    return ["spawn"]


def command(launcher: str, argv: list[str], operation_id: str) -> list[str]:
    """The command line for ``launcher``.

    systemd-run --scope, not a transient service: a scope runs the command as our own child
    (systemd-run registers the scope, moves itself into it, then execs the command), so the
    lease descriptor is inherited; a service is started by PID 1 and could inherit nothing.
    The scope is its own cgroup, so restarting the agent's unit never kills it; stopping the
    scope (systemctl stop hostagent-scrub-<operationID>.scope) sends SIGTERM: STOPPED.
    """
    if launcher == "systemd-run":
        return ["systemd-run", "--scope", "--quiet", "--no-ask-password", "--collect",
                f"--unit=hostagent-scrub-{operation_id}",
                f"--description=hostagent scrub {operation_id}", "--", *argv]
    return list(argv)


def _env(event_identity: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
    if event_identity:  # in the environment, not argv: /proc/PID/cmdline is world-readable
        env[EVENT_IDENTITY_ENV] = event_identity
    return env


def _launch(ctx, argv: list[str], lease_fd: int, operation_id: str, mode: str,
            event_identity: str | None = None):
    """Start the scrub process; returns (pid, launcher) once it says it runs."""
    failures = []
    for launcher in launchers(mode):
        ready_r, ready_w = os.pipe()  # both close-on-exec; ready_w is passed explicitly
        try:
            proc = subprocess.Popen(
                command(launcher, [*argv, "--ready-fd", str(ready_w)], operation_id),
                pass_fds=(lease_fd, ready_w), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), env=_env(event_identity))
        except OSError as exc:
            os.close(ready_r)
            failures.append(f"{launcher}: {exc.strerror}")
            continue
        finally:
            os.close(ready_w)  # only the child's copy now: EOF when it dies
        try:
            if _wait_ready(ctx, ready_r, proc):
                return proc.pid, launcher
        finally:
            os.close(ready_r)
        failures.append(f"{launcher}: {_how_it_ended(proc)}")
        logs.get(component="worker").warning("scrub_not_started", operation_id=operation_id,
                                             launcher=launcher, how=failures[-1])
    raise errors.OperationFailed("the scrub process did not start: " + "; ".join(failures))


def _wait_ready(ctx, fd: int, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        ctx.beat()
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            return os.read(fd, 1) == b"1"  # b"": it exited (or closed it) without saying so
    proc.kill()
    return False


def _how_it_ended(proc: subprocess.Popen) -> str:
    try:
        code = proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


def public(ddb, row: dict, probe: dict | None = ...) -> dict:
    """An operation as the API shows it (see StorageDomain.getOperationStatuses)."""
    return {"domainID": ddb.domain_id, "operationID": row["operation_id"], "type": row["type"],
            "state": operations.effective_state(ddb, row, probe),
            "progress": row["progress"], "host_id": row["host_id"], "task_id": row["task_id"],
            "pid": row["pid"], "started": row["started"], "updated": row["updated"],
            "ended": row["ended"], "stop_requested": row["stop_requested"],
            "result": row["result"], "error": row["error"]}


def start(ctx, args):
    operation_id = args["operationID"]
    with open_domain(args) as ddb:
        operations.ensure_schema(ddb)
        with local.acquire(operations.lease_path(ddb, "scrub"),
                           {**holder(ctx, "scrub"), "operation_id": operation_id}) as held:
            operations.register(ddb, operation_id, "scrub", ctx.host_id, ctx.task_id)
            lease_fd = held.fileno()  # the descriptor the scrub inherits: the lock goes with it
            argv = [sys.executable, "-m", "workers.scrubber", "--domain-path", args["path"],
                    "--domain-id", ddb.domain_id, "--operation-id", operation_id,
                    "--lease-fd", str(lease_fd), "--run-dir", ctx.run_dir,
                    "--host-id", ctx.host_id, "--task-id", ctx.task_id,
                    "--max-bytes-per-second", str(args["max_bytes_per_second"])]
            try:
                pid, launcher = _launch(ctx, argv, lease_fd, operation_id, args["launcher"],
                                        args.get("event_identity"))
            except errors.AgentError as exc:
                # We still hold the lease, so nobody runs it: it failed, say so on disk.
                operations.finish(ddb, operation_id, "FAILED", error=exc.to_json())
                raise
        # Our descriptor is closed; the scrub's keeps the lease. What we answer is what is on
        # disk now: STARTED, or already ended (an empty domain), or UNKNOWN if it died.
        out = {**public(ddb, operations.get(ddb, operation_id)), "launcher": launcher}
    if out["state"] == "STARTED":  # an end is announced by the scrub process itself
        ctx.event("Operation.state", {k: out[k] for k in (
            "domainID", "operationID", "type", "state", "progress", "host_id", "pid")})
    return out


def statuses(ctx, args):
    with open_domain(args) as ddb:
        rows = operations.listing(ddb)
        probes = {t: local.probe(operations.lease_path(ddb, t)) for t in {r["type"] for r in rows}}
        return {"domainID": ddb.domain_id,
                "operations": [public(ddb, r, probes[r["type"]]) for r in rows]}


def stop(ctx, args):
    with open_domain(args) as ddb:
        return public(ddb, operations.request_stop(ddb, args["operationID"]))
