"""`hostagent copy`, `hostagent continue`, `hostagent merge` and `hostagent wait`, with a live
progress bar.

The bar is fed by the client's wait_task (agent/client/wait.py): events while they flow,
polls of Task.getStatus when they do not, and the destination's status on storage once the
agent has forgotten the task (it restarted). Ctrl-C only stops watching: the copy goes on in
the agent, and what to type to follow it again or to abort it is printed (exit 130).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from agent.cli import output
from agent.cli.output import UsageError, escape
from agent.cli.storage import parse_location, show_location
from agent.client import NeedsContinuing, TaskFailed, TaskLost


def _outcome_json(outcome) -> dict:
    return {"taskID": outcome.task_id, "state": outcome.state, "via": outcome.via,
            "restarted": outcome.restarted, "result": outcome.result, "image": outcome.image,
            "error": outcome.error, "dst": outcome.dst}


def follow(ctx, run, task_id, dst: dict | None, label: str, again: str | None = None) -> int:
    """Run `run(on_progress)` (a wait that returns a done Outcome or raises) under a bar.
    `again`: what to type to continue the work (default: a copy's continue)."""
    bar = ctx.bar(label, in_bytes=dst is not None)
    began = time.monotonic()
    outcome = None
    try:
        with bar or contextlib.nullcontext():
            outcome = run(bar.update if bar else None)
            if bar:
                bar.finish()
    except KeyboardInterrupt:
        return detached(ctx, task_id, dst)
    except NeedsContinuing as exc:
        return stopped(ctx, exc.outcome, again)
    except TaskFailed as exc:
        if ctx.json:
            output.emit_json(_outcome_json(exc.outcome))
            return output.AGENT_ERROR
        what = "was aborted" if exc.outcome.state == "aborted" else "failed"
        output.error(f"task {task_id} {what}: {exc.name} ({exc.code}): {exc.message}")
        if dst:
            output.error(f"the {'base' if again else 'destination'} stays ILLEGAL at its last "
                         f"checkpoint; continue it: "
                         f"{again or f'hostagent continue {show_location(dst)} --wait'}")
        return output.AGENT_ERROR
    except TaskLost as exc:
        if ctx.json:
            output.emit_json(_outcome_json(exc.outcome))
        else:
            output.error(str(exc))
        return output.AGENT_ERROR
    if ctx.json:
        output.emit_json(_outcome_json(outcome))
        return output.OK
    took = time.monotonic() - began
    if dst:
        image = outcome.image or outcome.result or {}
        size = image.get("total") or image.get("size") or (outcome.result or {}).get("total")
        how = " (the agent restarted meanwhile)" if outcome.restarted else ""
        ctx.out.print(f"[green]done[/]: {output.size(size)} in {took:.1f} s{how}; "
                      f"{show_location(dst)} is LEGAL", soft_wrap=True)
    else:
        ctx.out.print(f"[green]done[/]: task {escape(str(task_id))}: "
                      f"{escape(json.dumps(outcome.result))}")
    return output.OK


def detached(ctx, task_id, dst) -> int:
    follow_cmd = f"hostagent wait {task_id}" + (f" --dst {show_location(dst)}" if dst else "")
    abort = json.dumps({"taskID": str(task_id)})
    output.error(f"detached: task {task_id} goes on in the agent (Ctrl-C does not abort it)\n"
                 f"  follow it again: {follow_cmd}\n"
                 f"  abort it:        hostagent call Task.abort '{abort}'")
    return output.DETACHED


def stopped(ctx, outcome, again: str | None = None) -> int:
    if ctx.json:
        output.emit_json(_outcome_json(outcome))
        return output.NEEDS_CONTINUING
    image = outcome.image or {}
    copy = image.get("copy") or image.get("merge") or {}
    loc = show_location(outcome.dst)
    errs = [f"{(e.get('data') or {}).get('name')}: {e.get('message')}"
            for e in copy.get("errors") or []]
    what, verb = (f"the merge into {loc}", "merging") if again else (f"the copy into {loc}",
                                                                       "copying")
    output.error(f"{what} stopped at {output.size(copy.get('copied'))} of "
                 f"{output.size(copy.get('total'))} ({copy.get('state')}) and nobody is "
                 f"{verb} it" + (f"; errors: {'; '.join(errs)}" if errs else "") + "\n"
                 f"  continue it: {again or f'hostagent continue {loc} --wait'}"
                 + ("" if again else f"\n  or delete it: hostagent volume delete {loc}"))
    return output.NEEDS_CONTINUING


def merge(ctx, args) -> int:
    """Remove snapshot TOP: merged into its parent (looked up, or --into: then the agent
    checks it, and a merge done before is answered done though TOP is gone)."""
    top = parse_location(args.top)
    parent = args.into and parse_location(f"{top['domainID']}/{top['imageID']}/{args.into}")
    if not parent:
        parent = ctx.client.call("Volume.getInfo", top).get("parent")
        if parent is None:
            raise UsageError(f"{show_location(top)} has no parent: a base has nothing to "
                             "merge into")
    else:
        parent = parent["volumeID"]
    base = {**top, "volumeID": parent}
    task_id = args.id or f"merge-{uuid.uuid4().hex[:8]}"
    again = f"hostagent merge {show_location(top)} --wait"
    if not args.wait:
        first = ctx.client.merge_image(base, top["volumeID"], wait=False, task_id=task_id)
        if ctx.json:
            output.emit_json({**first, "base": base})
        else:
            ctx.out.print(f"merging {top['volumeID']} into {show_location(base)} as task "
                          f"{escape(str(task_id))}\n  follow it: hostagent wait "
                          f"{escape(str(task_id))} --dst {show_location(base)}")
        return output.OK
    return follow(ctx, lambda cb: ctx.client.merge_image(
        base, top["volumeID"], True, task_id=task_id, on_progress=cb, **_wait_options(args)),
        task_id, base, f"merge {top['volumeID'][:8]}", again)


def _wait_options(args) -> dict:
    return {"poll_interval": args.poll, "settle": args.settle}


def copy(ctx, args) -> int:
    src = parse_location(args.src)
    dst = parse_location(args.dst, fill=True)
    task_id = args.id or f"copy-{uuid.uuid4().hex[:8]}"
    how = {"mode": args.mode, "format": args.format}
    if not args.wait:
        return started(ctx, ctx.client.copy_image(src, dst, wait=False, task_id=task_id,
                                                  **how), dst)
    return follow(ctx, lambda cb: ctx.client.copy_image(
        src, dst, True, task_id=task_id, on_progress=cb, **how, **_wait_options(args)),
        task_id, dst, f"copy {dst['volumeID'][:8]}")


def continue_(ctx, args) -> int:
    dst = parse_location(args.dst)
    src = parse_location(args.src) if args.src else None
    task_id = args.id or f"copy-{uuid.uuid4().hex[:8]}"
    if not args.wait:
        return started(ctx, ctx.client.continue_copy(dst, src, wait=False, task_id=task_id), dst)
    return follow(ctx, lambda cb: ctx.client.continue_copy(
        dst, src, True, task_id=task_id, on_progress=cb, **_wait_options(args)),
        task_id, dst, f"copy {dst['volumeID'][:8]}")


def started(ctx, first: dict, dst: dict) -> int:
    if ctx.json:
        output.emit_json({**first, "dst": dst})
        return output.OK
    task_id = first.get("taskID")
    if task_id is None:
        ctx.out.print(f"{show_location(dst)} is LEGAL already: nothing to copy")
        return output.OK
    ctx.out.print(f"copying into {show_location(dst)} as task {escape(str(task_id))}: "
                  f"{output.size(first.get('copied'))} of {output.size(first.get('total'))} "
                  f"there, attempt {first.get('attempts')}\n"
                  f"  follow it: hostagent wait {escape(str(task_id))} --dst {show_location(dst)}")
    return output.OK


def wait(ctx, args) -> int:
    dst = parse_location(args.dst) if args.dst else None

    def run(cb):
        return ctx.client.wait_task(args.task_id, dst=dst, on_progress=cb,
                                    **_wait_options(args)).raise_for_state()
    label = f"copy {dst['volumeID'][:8]}" if dst else f"task {args.task_id}"
    return follow(ctx, run, args.task_id, dst, label)


def add_parsers(sub, common) -> None:
    waiting = common.__class__(add_help=False)
    waiting.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                         help="poll this often when events are silent (default 1)")
    waiting.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                         help="a copy nobody holds for this long needs continuing (default 10)")
    p = sub.add_parser("copy", parents=[common, waiting],
                       help="copy a volume; with --wait, show its progress until it is LEGAL")
    p.add_argument("src", metavar="SRC", help="DOMAIN/IMAGE/VOLUME")
    p.add_argument("dst", metavar="DST", help="DOMAIN[/IMAGE[/VOLUME]]: left-out or `new` "
                                              "parts get fresh UUIDs")
    p.add_argument("--wait", action="store_true", help="follow the copy to its end")
    p.add_argument("--id", help="the task ID (default: copy-<random>)")
    p.add_argument("--mode", choices=("collapse", "chain"),
                   help="collapse (default): SRC's guest view into one volume; chain: every "
                        "volume of SRC's chain, same structure")
    p.add_argument("--format", choices=("raw", "cow"),
                   help="a collapse's destination format (default: the source's)")
    p.set_defaults(func=copy)
    p = sub.add_parser("continue", parents=[common, waiting],
                       help="continue a copy from its last checkpoint")
    p.add_argument("dst", metavar="DST", help="DOMAIN/IMAGE/VOLUME (the ILLEGAL destination)")
    p.add_argument("--src", help="its source (default: the one its copy marker names)")
    p.add_argument("--wait", action="store_true", help="follow the copy to its end")
    p.add_argument("--id", help="the task ID (default: copy-<random>)")
    p.set_defaults(func=continue_)
    p = sub.add_parser("merge", parents=[common, waiting],
                       help="remove a snapshot: merge it into its parent; with --wait, show "
                            "its progress until done")
    p.add_argument("top", metavar="TOP", help="DOMAIN/IMAGE/VOLUME: the snapshot to remove")
    p.add_argument("--into", metavar="VOLUME",
                   help="its parent (default: looked up; given, a merge done before is "
                        "answered done)")
    p.add_argument("--wait", action="store_true", help="follow the merge to its end")
    p.add_argument("--id", help="the task ID (default: merge-<random>)")
    p.set_defaults(func=merge)
    p = sub.add_parser("wait", parents=[common, waiting],
                       help="follow a task to its end (a copy's, across agent restarts)")
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--dst", help="a copy's destination: follow it on storage once the task "
                                 "is gone")
    p.set_defaults(func=wait)
