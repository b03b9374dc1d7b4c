"""`hostagent upload FILE DST` and `hostagent download SRC FILE`, with a progress bar.

The data goes over NBD between a private qemu-nbd of the local file and the agent's export
(Export.start; agent/client/transfer.py moves it): zeros and holes are never sent, several
connections move 4 MiB blocks at once. A transfer cut short (this command killed, the agent
killed, the host down) is resumed by running the same command again: both ends' block
digests are compared and only the blocks that differ are sent. An upload's volume stays
ILLEGAL until Export.finish has checked what was written against the checksum of what was
sent; a download keeps a small state file beside FILE until it is whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from types import SimpleNamespace

import blake3

from agent.cli import output
from agent.cli.storage import parse_location, show_location
from agent.client import CallError, ends
from agent.client import transfer as tx
from agent.system import fsync_path

STATE_SUFFIX = ".hostagent-download"
CHECKSUM_BLOCKS = 4096  # block digests one Image.checksum answers


class TransferError(Exception):
    """A transfer that cannot go on as asked: the message says why and what to do."""


def progress(bar, total: int):
    done = [0]

    def on_block(index, length):
        done[0] += length
        if bar is not None:
            bar.update(SimpleNamespace(total=total, copied=done[0], percent=None))
    return on_block


def remote_digests(ctx, loc: dict, size: int, layer: bool = False) -> dict[int, bytes]:
    """Each 4 MiB block's digest of a volume's guest view, computed by the agent."""
    out: dict[int, bytes] = {}
    step = CHECKSUM_BLOCKS * tx.BLOCK
    for offset in range(0, size, step):
        params = {**loc, "blocks": {"offset": offset, "length": step}}
        if layer:
            params["layer"] = True
        answer = ctx.calls.call("Image.checksum", params,
                                timeout=max(ctx.settings.timeout, 600))
        for i, digest in enumerate(answer["blocks"]):
            out[offset // tx.BLOCK + i] = bytes.fromhex(digest)
    return out


def _wait_ended(ctx, task_id: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = ctx.calls.call("Task.getStatus", {"taskID": task_id})["state"]
        except CallError as exc:
            if exc.name == "NoSuchTask":
                return
            raise
        if state not in ("pending", "running", "aborting"):
            return
        time.sleep(0.1)
    raise TransferError(f"the export {task_id} did not end within {seconds:.0f} s")


def _local_format(path: str, given: str | None) -> str:
    if given:
        return given
    if ends.is_qcow2(path):
        raise output.UsageError(f"{path} is a qcow2 image: say --local-format qcow2 (read as "
                                f"its guest view) or --local-format raw (its bytes as they "
                                f"are)")
    return "raw"


def threads(export: dict) -> int:
    """Connections that move blocks: 4, within what the export serves at once (one more
    connection reads its block status; a connection past its limit would wait for ever)."""
    return max(1, min(tx.THREADS, export.get("max_connections", 8) - 1))


def _tag(path: str, size: int) -> str:
    """What an upload is of: the local file's identity (a changed file is another upload)."""
    st = os.stat(path)
    ident = f"{os.path.realpath(path)}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return f"upload:{size}:{blake3.blake3(ident.encode()).hexdigest()[:32]}"


def upload(ctx, args) -> int:
    fmt = _local_format(args.file, args.local_format)
    dst = parse_location(args.dst, fill=True)
    with ends.Local(args.file, fmt) as local:
        probe = local.connect()
        size = probe.size()
        probe.shutdown()
        volume_format = args.format or ("cow" if fmt == "qcow2" else "raw")
        tag = _tag(args.file, size)
        stats = tx.Stats()
        began = time.monotonic()
        status = _status(ctx, dst)
        if status is not None and status.get("transfer") is None:
            return _already_there(ctx, dst, status, local, size, stats, began)
        fresh, digests = status is None, {}
        if status is not None:
            digests = _prepare_resume(ctx, dst, status, tag, local, size)
        export_id = f"upload-{uuid.uuid4().hex[:8]}"
        params = {**dst, "mode": "write", "tag": tag}
        if fresh:
            params["create"] = {"size": size, "format": volume_format}
        exp = ctx.calls.call("Export.start", params, id=export_id)
        wanted = None if fresh else tx.differing(digests["local"], digests["remote"],
                                                 tx.block_count(size))
        if wanted is not None:
            stats.add(skipped=size - tx.bytes_of(wanted, size))
        bar = ctx.bar(f"upload {dst['volumeID'][:8]}", True)
        try:
            with bar or contextlib.nullcontext():
                moved = tx.run_blocks(local.connect, lambda: ends.connect_export(exp["socket"]),
                                      size, fresh=fresh, wanted=wanted, stats=stats,
                                      threads=threads(exp),
                                      on_block=progress(bar, size), rate=args.rate,
                                      flush_every=tx.FLUSH_SECONDS)
        except KeyboardInterrupt:
            ctx.calls.call("Export.stop", {"taskID": export_id})
            output.error(f"interrupted: {show_location(dst)} stays ILLEGAL; run the same "
                         f"command again to resume")
            return output.DETACHED
        except BaseException:
            with contextlib.suppress(Exception):  # the agent may be the one that died
                ctx.calls.call("Export.stop", {"taskID": export_id}, timeout=2)
            raise
        every = [moved.get(i) or digests.get("local", {}).get(i)
                 for i in range(tx.block_count(size))]
        expected = tx.checksum(every)
        result = ctx.calls.call("Export.stop", {"taskID": export_id, "finish": True,
                                                "checksum": expected},
                                id=f"finish-{uuid.uuid4().hex[:8]}",
                                timeout=max(ctx.settings.timeout, 3600))
    return done(ctx, "upload", dst, result, stats, began, size, resumed=not fresh)


def _status(ctx, loc: dict) -> dict | None:
    try:
        return ctx.calls.call("Image.getStatus", loc)
    except CallError as exc:
        if exc.name == "NoSuchVolume":
            return None
        raise


def _already_there(ctx, dst, status, local, size, stats, began) -> int:
    """A volume with no transfer: this upload, finished by an earlier run whose answer was
    lost (it then holds exactly FILE: Export.finish says so from its recorded checksum),
    or another volume, which is never written over."""
    if status["legality"] == "LEGAL":
        digests = tx.run_blocks(local.connect, None, size, fresh=True)
        expected = tx.checksum([digests[i] for i in range(tx.block_count(size))])
        try:
            result = ctx.calls.call("Export.finish", {**dst, "checksum": expected},
                                    id=f"finish-{uuid.uuid4().hex[:8]}")
        except CallError as exc:
            if exc.name != "TransferConflict":
                raise
        else:
            stats.add(skipped=size)
            return done(ctx, "upload", dst, result, stats, began, size, resumed=True)
    raise TransferError(f"{show_location(dst)} exists ({status['legality']}) and has no "
                        f"upload of this file in progress: upload into a new volume")


def _prepare_resume(ctx, dst, status, tag, local, size) -> dict:
    """An upload into a volume that exists: only its own transfer goes on. A live export of
    it (this command's, killed) is stopped first; then both ends' digests are taken."""
    transfer = status["transfer"]
    if transfer.get("tag") not in (None, tag):
        raise TransferError(f"{show_location(dst)} has another upload in progress (another "
                            f"file, or this file changed since): delete the volume to start "
                            f"over")
    if transfer["state"] == "serving" and transfer.get("task_id"):
        with contextlib.suppress(CallError):
            ctx.calls.call("Export.stop", {"taskID": transfer["task_id"]})
        _wait_ended(ctx, transfer["task_id"])
    remote = remote_digests(ctx, dst, size)
    local_digests = tx.run_blocks(local.connect, None, size, fresh=True)
    return {"local": local_digests, "remote": remote}


def done(ctx, what, loc, result, stats, began, size, resumed) -> int:
    took = time.monotonic() - began
    counts = stats.as_dict()
    if ctx.json:
        output.emit_json({"state": "done", "location": loc, "result": result, "bytes": counts,
                          "seconds": round(took, 3), "resumed": resumed})
        return output.OK
    ctx.out.print(f"[green]done[/]: {what} of {output.size(size)} in {took:.1f} s: "
                  f"{output.size(counts['sent'])} sent, {output.size(counts['skipped'])} "
                  f"there already" + (" (resumed)" if resumed else "") +
                  f"; {show_location(loc)}" + (" is LEGAL" if what == "upload" else ""),
                  soft_wrap=True)
    return output.OK


def download(ctx, args, checkpoint: str | None = None, what: str = "download") -> int:
    """A volume's guest view into FILE (resumed if FILE is a partial download of it);
    `checkpoint`: a full backup's, the bitmap its export starts (agent/cli/backup.py)."""
    src = parse_location(args.src)
    info = ctx.calls.call("Volume.getInfo", src)
    size, fmt = info["size"], args.format
    state_path = args.file + STATE_SUFFIX
    want = {"src": src, "generation": info["generation"], "size": size, "format": fmt,
            "layer": args.layer, **({"checkpoint": checkpoint} if checkpoint else {})}
    resume = download_state(args, state_path, want)
    if not resume:
        _make_local(args.file, fmt, size)
    else:
        stop_earlier(ctx, state_path)
    stats, began = tx.Stats(), time.monotonic()
    export_id = f"download-{uuid.uuid4().hex[:8]}"
    write_state(state_path, {**want, "export": export_id})  # a killed run's, to stop
    params = {**src, "mode": "layer" if args.layer else "read"}
    if checkpoint:
        params["checkpoint"] = checkpoint
    exp = ctx.calls.call("Export.start", params, id=export_id)

    def move(local, bar):
        wanted = None
        if resume:
            remote = remote_digests(ctx, src, size, layer=args.layer)
            mine = tx.run_blocks(local.connect, None, size, fresh=True)
            wanted = tx.differing(mine, remote, tx.block_count(size))
            stats.add(skipped=size - tx.bytes_of(wanted, size))
        with bar or contextlib.nullcontext():
            tx.run_blocks(lambda: ends.connect_export(exp["socket"]), local.connect, size,
                          fresh=not resume, wanted=wanted, stats=stats, threads=threads(exp),
                          on_block=progress(bar, size), rate=args.rate, digests=False)
    if not pull(ctx, args, fmt, export_id, state_path, f"{what} {src['volumeID'][:8]}", move):
        return output.DETACHED
    return done(ctx, what, src, {"file": args.file, "format": fmt}, stats, began, size, resume)


def pull(ctx, args, fmt: str, export_id: str, state_path: str, label: str, move) -> bool:
    """`move(local, bar)`: the export's data into FILE (through ends.Local, with a progress
    bar unless --json); then FILE made durable and its state file gone. The export is
    stopped either way. False if interrupted (Ctrl-C: FILE stays partial, resumable)."""
    try:
        with ends.Local(args.file, fmt, writable=True) as local:
            move(local, ctx.bar(label, True))
    except KeyboardInterrupt:
        output.error(f"interrupted: {args.file} is partial; run the same command again to "
                     f"resume")
        return False
    finally:
        with contextlib.suppress(Exception):  # the agent may be the one that died
            ctx.calls.call("Export.stop", {"taskID": export_id}, timeout=2)
    fsync_path(args.file)
    os.unlink(state_path)
    return True


def download_state(args, state_path: str, want: dict) -> bool:
    """Whether FILE is a partial download of this source to go on with; TransferError if
    it is of another source, or the source changed since (never overwritten blindly)."""
    exists = os.path.exists(args.file)
    if not exists or args.restart:
        return False
    try:
        with open(state_path) as f:
            had = json.load(f)
    except FileNotFoundError:
        raise TransferError(f"{args.file} exists and is not a partial download: choose "
                            f"another file, or --restart to overwrite it") from None
    except ValueError:
        raise TransferError(f"{state_path} is damaged: --restart to start over") from None
    keys = ("src", "size", "format", "layer", "checkpoint", "bitmap", "base")
    if {k: had.get(k) for k in keys} != {k: want.get(k) for k in keys}:
        raise TransferError(f"{args.file} is a partial download of another volume or format: "
                            f"--restart to start over")
    if had.get("generation") != want["generation"]:
        raise TransferError(f"the source changed since this download began (generation "
                            f"{had.get('generation')}, now {want['generation']}): --restart "
                            f"to start over")
    return True


def stop_earlier(ctx, state_path: str) -> None:
    """The export a killed run of this download left serving (it would end once idle)."""
    with open(state_path) as f:
        earlier = json.load(f).get("export")
    if earlier:
        with contextlib.suppress(CallError):
            ctx.calls.call("Export.stop", {"taskID": earlier})


def write_state(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _make_local(path: str, fmt: str, size: int) -> None:
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1", path,
                        str(size)], check=True, capture_output=True, timeout=120)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _nbd_error():
    try:
        return ends.nbd_module().Error
    except RuntimeError:
        return RuntimeError


def run(func):
    """A transfer's refusal is one line and exit 1, as the agent's errors are."""
    def wrapped(ctx, args) -> int:
        try:
            return func(ctx, args)
        except Exception as exc:
            if not isinstance(exc, (TransferError, RuntimeError, _nbd_error())):
                raise
            if not isinstance(exc, TransferError):  # the data path broke (NBD, qemu-nbd)
                exc = TransferError(f"the transfer broke off: {exc}; run the same command "
                                    f"again to resume")
            if ctx.json:
                output.emit_json({"state": "failed", "error": str(exc)})
            else:
                output.error(str(exc))
            return output.AGENT_ERROR
    return wrapped


def rate(p) -> None:
    p.add_argument("--rate", type=output.parse_size, default=0, metavar="BYTES",
                   help="at most this much data a second (e.g. 100M; default: unlimited)")


def add_parsers(sub, common) -> None:
    p = sub.add_parser("upload", parents=[common],
                       help="upload a local disk image into a volume (again: resume)")
    p.add_argument("file", metavar="FILE", help="a raw or qcow2 file (its guest view is sent)")
    p.add_argument("dst", metavar="DST", help="DOMAIN[/IMAGE[/VOLUME]]: a new volume (left-out "
                                              "or `new` parts get fresh UUIDs), or one whose "
                                              "upload of FILE was cut short")
    p.add_argument("--local-format", choices=("raw", "qcow2"),
                   help="FILE's format (given to qemu, never guessed: a qcow2 FILE must say "
                        "so); default raw")
    p.add_argument("--format", choices=("raw", "cow"),
                   help="the new volume's format (default: cow for a qcow2 FILE, else raw)")
    rate(p)
    p.set_defaults(func=run(upload))
    p = sub.add_parser("download", parents=[common],
                       help="download a volume's guest view into a local file (again: resume)")
    p.add_argument("src", metavar="SRC", help="DOMAIN/IMAGE/VOLUME")
    p.add_argument("file", metavar="FILE", help="the local file (made sparse)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw",
                   help="FILE's format (default raw)")
    p.add_argument("--layer", action="store_true",
                   help="only what the volume itself holds, not its chain's guest view")
    p.add_argument("--restart", action="store_true",
                   help="overwrite FILE even if it is not a partial download of SRC")
    rate(p)
    p.set_defaults(func=run(download))
