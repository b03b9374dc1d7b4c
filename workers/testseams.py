"""Fault seams for tests, switched on only by the HOSTAGENT_TEST_FAULTS environment variable.

Faults that cannot be caused for real on a test machine are injected here, inside a real
worker of a real agent; nothing else in the agent changes. The variable holds JSON:

  {"crash_after_writes": N}   SIGKILL this worker right after its N-th metadata commit or
                              before its N-th data fsync (the crash-point sweep)
  {"crash_after": "commit:merge_committed", "skip": K}
                              SIGKILL this worker right after the (K+1)-th metadata commit
                              or write of that name (a commit is "commit:<op>"; a merge's
                              rewrite of its child's header is "write:repoint-header")
  {"crash_before": "begin:abandon", "once": PATH}
                              SIGKILL this worker right before a write transaction of that
                              name begins; with "once", only the worker that removes the
                              file at PATH (the test made it): one death, then sound runs
  {..., "op": "export.finish"}  only in workers of that op (the others run sound)
  {"io_error": {"kind": "copy" | "fsync", "errno": "EIO", "at_offset": X}}
                              raise that OSError the first time the copy engine does `kind`
                              at or past offset X (EIO on read: the kernel-side copy call
                              reads and writes at once, so its error stands for both)

An agent started with it logs a warning, so it is never on by accident.
"""

from __future__ import annotations

import errno
import json
import os
import signal

ENV = "HOSTAGENT_TEST_FAULTS"


def install_from_env(op: str | None = None) -> dict | None:
    raw = os.environ.get(ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    if spec.get("op") not in (None, op):
        return None
    from agent.storage import metadata
    from agent.storage.copy import kernel

    if "crash_after_writes" in spec:
        left = [int(spec["crash_after_writes"])]

        def count(_what, *_):
            left[0] -= 1
            if left[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)
        metadata._after_write_hook = count
        kernel._fault = lambda kind, offset: count(kind) if kind == "fsync" else None
    if "crash_after" in spec:
        seen = [int(spec.get("skip", 0))]

        def named(what, *_):
            if what == spec["crash_after"]:
                seen[0] -= 1
                if seen[0] < 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        metadata._after_write_hook = named
    if "crash_before" in spec:

        def before(what):
            if what != spec["crash_before"]:
                return
            if "once" in spec:
                try:
                    os.unlink(spec["once"])
                except FileNotFoundError:
                    return  # another worker died already
            os.kill(os.getpid(), signal.SIGKILL)
        metadata._before_write_hook = before
    if "io_error" in spec:
        want = spec["io_error"]
        code = getattr(errno, want.get("errno", "EIO"))

        def fault(kind, offset):
            if kind == want["kind"] and offset >= want.get("at_offset", 0):
                raise OSError(code, os.strerror(code))
        kernel._fault = fault
    return spec
