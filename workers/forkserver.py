"""The fork server: a process prepared at start-up that forks one worker per operation.

Why: a fresh interpreter that imports pyzmq costs ~50 ms; a fork of a process with the
imports already done costs a few. It never creates a ZeroMQ context, so forking is safe (a
process must never fork while it holds a live one).

Each worker is double-forked: the intermediate child exits at once, so the worker is adopted
by the nearest subreaper, the supervisor. The supervisor then reaps its workers itself and
sees exactly how each one died, and a worker's parent-death signal fires when the supervisor
dies (workers/runtime.py sets it once adopted).

Protocol on fd 3 (a socketpair to the supervisor): one JSON request per line in, one JSON
reply per line out: {"token": ..., "pid": N} or {"token": ..., "error": "..."}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

CONTROL_FD = 3


def spawn(request: dict, supervisor_pid: int, control: socket.socket) -> dict:
    from workers import runtime

    rfd, wfd = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(rfd)
        os.close(wfd)
        return {"token": request["token"], "error": f"fork failed: {exc.strerror}"}
    if pid == 0:  # the intermediate: fork the worker, say its pid, vanish
        try:
            os.close(rfd)
            worker = os.fork()
            if worker == 0:
                os.close(wfd)
                control.close()
                runtime.main(request, supervisor_pid)  # never returns
            os.write(wfd, str(worker).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 32):
        data += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    if not data:
        return {"token": request["token"], "error": "fork failed in the intermediate"}
    return {"token": request["token"], "pid": int(data)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hostagent-forkserver")
    parser.add_argument("--supervisor-pid", type=int, required=True)
    parser.add_argument("--run-dir", required=True)  # names this agent's processes for psutil
    args = parser.parse_args(argv)

    from agent import system

    system.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != args.supervisor_pid:  # the supervisor died before we got here
        os._exit(0)
    # The supervisor's terminal Ctrl-C must not reach us through the process group first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # Preload everything a worker imports, so a forked worker imports nothing.
    from workers import ops, runtime  # noqa: F401

    ops.preload()

    control = socket.socket(fileno=CONTROL_FD)
    reader = control.makefile("rb")
    for line in reader:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        reply = spawn(request, args.supervisor_pid, control)
        control.sendall(json.dumps(reply).encode() + b"\n")
    os._exit(0)  # the supervisor closed its end: it is gone


if __name__ == "__main__":
    main(sys.argv[1:])
