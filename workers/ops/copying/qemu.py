"""Copies that go through qemu: any copy but raw to raw of one volume (which stays a kernel
copy, workers/ops/image.py), and every layer of a chain copy.

The source chain is exported read-only by one qemu-nbd, a qcow2 destination writable by
another, both private to this worker (agent/storage/qemu_nbd.py); a raw destination is
written by the worker itself (agent/storage/copy/sink.py); agent/storage/copy/nbd.py moves
the bytes. A resumed copy reopens the same destination (a qcow2 first checked, its leaked
clusters reclaimed; one qemu cannot open is started over) and goes on from its checkpoint,
reading the earlier life's prefix back for the checksum.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

from agent import errors
from agent.storage import chain, checksum, qcow2, qemu_img, qemu_nbd, sizing
from agent.storage.copy import nbd, sink
from agent.storage.copy.kernel import CopyStopped
from agent.storage.metadata import DomainDB
from agent.storage.volumes import FORMATS
from workers.protocol import Stopped

# The largest layer whose block digests a chain copy keeps for the next layer: a digest a
# 4 MiB block, about 74 bytes each in a list (the digests of zero blocks shared), so 18 MiB
# at most for a dense 1 TiB layer; a larger one's child reads its parent's blocks for the
# checksum, as when they are not known.
KEEP_MAX = 1 << 40


def _files(db: DomainDB, rows: list[dict]) -> list[tuple]:
    """Each layer's data file as (path, device, inode, length), to tell at the end that the
    files qemu read are still the chain's."""
    out = []
    for row in rows:
        path = db.layout.data_path(row)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise errors.CopyConflict("a data file of the source's chain is missing",
                                      volumeID=row["volume_id"], reason="source-gone") from None
        if row["format"] == "raw" and st.st_size < row["size"]:
            raise errors.VolumeTruncated(
                f"the source's data ends at {st.st_size} bytes, before its size of "
                f"{row['size']}", volumeID=row["volume_id"], size=row["size"],
                data_bytes=st.st_size)
        out.append((path, st.st_dev, st.st_ino, st.st_size))
    return out


def check_files(db: DomainDB, rows: list[dict], before: list[tuple]) -> None:
    now = _files(db, rows)
    for (path, dev, ino, _), (_, dev2, ino2, _) in zip(before, now):
        if (dev, ino) != (dev2, ino2):
            raise errors.CopyConflict("a data file of the source's chain was replaced during "
                                      "the copy", reason="source-replaced", path=path)


def check_room(src_db: DomainDB, src_rows: list[dict], dst_db: DomainDB,
               formats: list[str], headers: dict, checks: dict, beat) -> None:
    """NoSpace before anything is made if the destination's domain cannot hold the copy. A
    copy's destination is sparse (holes and zeros are not written): what it holds is the
    source's data, not its virtual size (a 1 TiB disk holding 1 GiB needs 1 GiB). First a
    bound from what the checks found allocated (`headers` and `checks`: chain.inspect's, by
    volume ID; agent/storage/sizing.py): room for it, and there is room. Else qemu-img
    measure of what it needs (a chain copy: each layer's own data, measured side by side;
    a raw destination: what measure says a qcow2 needs, the data and a little metadata,
    not its raw figure, which is the whole virtual size), against the domain's free space.
    `beat`: the worker's heartbeat, called from here only (it is not thread-safe)."""
    st = os.statvfs(dst_db.layout.root)
    free = st.f_bavail * st.f_frsize
    if _bound(src_db, src_rows, formats, headers, checks) <= free:
        return

    def measure(i: int) -> int:
        layer = len(formats) > 1 and i > 0
        rows = src_rows[:i + 1] if len(formats) > 1 else src_rows
        opts = chain.image_opts(src_db.layout, rows, direct=False, layer_only=layer)
        return qemu_img.measure("cow", opts).get("required", 0)
    with concurrent.futures.ThreadPoolExecutor(min(4, len(formats))) as pool:
        futures = [pool.submit(measure, i) for i in range(len(formats))]
        while concurrent.futures.wait(futures, timeout=0.25).not_done:
            beat()
    need = sum(future.result() for future in futures)
    if need > free:
        raise errors.NoSpace(f"the copy needs {need} bytes (the source's data: its "
                             f"destination is sparse), the domain has {free} free",
                             needed=need, free=free)


def _bound(src_db: DomainDB, src_rows: list[dict], formats: list[str], headers: dict,
           checks: dict) -> float:
    """At most what the copy's destination holds (infinity where a layer's data is not
    known): collapsed, the data of every layer in the leaf's clusters; as a chain, each
    layer's own in its own (a destination is laid out as its source: cluster_layout)."""
    clusters = [getattr(headers.get(row["volume_id"]), "cluster_size", sizing.CLUSTER)
                for row in src_rows]
    if len(formats) == 1:
        grains = [clusters[-1] if formats[0] == "cow" else 1] * len(src_rows)
    else:
        grains = [c if fmt == "cow" else 1 for c, fmt in zip(clusters, formats)]
    held = [sizing.data_bound(src_db.layout, row, headers.get(row["volume_id"]),
                              checks.get(row["volume_id"]), grain)
            for row, grain in zip(src_rows, grains)]
    if None in held:
        return float("inf")
    if len(formats) == 1:
        size = src_rows[-1]["size"]
        whole = -(-size // grains[-1]) * grains[-1]  # every cluster of the disk, at most
        return sizing.sparse_bound(min(sum(held), whole), size, formats[0], clusters[-1])
    return sum(sizing.sparse_bound(*layer) for layer in zip(
        held, (row["size"] for row in src_rows), formats, clusters))


def cluster_layout(db: DomainDB, row: dict) -> dict:
    """How the source's qcow2 lays out its clusters ({cluster_size, extended_l2}; nothing
    for raw), from its header: a destination laid out the same is as thin as its source (an
    extended-L2 source's 4 KiB writes stay subclusters, not whole 2 MiB clusters)."""
    if row["format"] != "cow":
        return {}
    head = qcow2.read(db.layout.data_path(row), row["volume_id"])
    return {"cluster_size": head.cluster_size, "extended_l2": head.extended_l2}


def prepare_destination(db: DomainDB, rows: list[dict], fresh: bool, cluster: dict,
                        beat, restart=lambda: True) -> bool:
    """Make or reopen the destination's data file (rows: its chain, base first, it last).
    Returns whether it is fresh: a resumed qcow2 qemu cannot use is made again, and the
    copy starts over rather than fails for ever; `restart()` first records that nothing of
    it is durable any more (checkpoint 0), so a crash meanwhile cannot leave a marker that
    vouches for data the new file does not have."""
    row = rows[-1]
    fmt = row["format"]
    path = db.layout.data_path(row)
    if not fresh and os.path.exists(path):
        if fmt == "raw":
            return False
        try:
            chain.inspect(db.layout, rows, beat)  # its header first: before qemu opens it
            qemu_img.check(chain.image_opts(db.layout, rows[-1:], direct=False,
                                            layer_only=True), path, repair_leaks=True,
                           beat=beat)
            return False
        except errors.ImageInvalid:
            pass  # what an earlier life left is unusable: start over
    if not fresh and not restart():
        raise errors.GenerationMismatch("superseded before the copy restarted",
                                        volumeID=row["volume_id"])
    parent = rows[-2] if len(rows) > 1 else None
    FORMATS[fmt].create(path, row["size"], parent=parent, beat=beat, **cluster)
    return True


def source_opts(src_db: DomainDB, src_rows: list[dict], share: bool = False) -> str:
    """The source chain's --image-opts for a copy's read-only qemu-nbd (`share`: a merge's,
    chain.image_opts), O_DIRECT where its file system takes it."""
    path = src_db.layout.data_path(src_rows[-1])
    return chain.image_opts(src_db.layout, src_rows, share=share,
                            direct=qemu_img.direct_io(path))


class Ahead:
    """A chain copy's next layer, begun on a thread of its own once the layer before it
    copies (each layer's source qemu-nbd start and destination file otherwise cost it
    15-20 ms in turn, and on a busy CPU their starts slowed the other exports'): its
    source's qemu-nbd started, not connected (unless it is `empty` and reads nothing),
    and its fresh destination's file made. What failed here is done again the usual way
    when the layer's turn comes (a lock a killed writer still holds is waited out there);
    no heartbeat is called from the thread (a worker's is not thread-safe). Closed by
    move, or by the chain's end if the layer's turn never came."""

    def __init__(self, src_db: DomainDB, src_rows: list[dict], dst_db: DomainDB,
                 dst_rows: list[dict], *, empty: bool):
        self.opts = source_opts(src_db, src_rows)
        self._exports = contextlib.ExitStack()
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._job = self._pool.submit(self._begin, src_db, src_rows, dst_db, dst_rows, empty)

    def _begin(self, src_db, src_rows, dst_db, dst_rows, empty: bool):
        src = None if empty else self._exports.enter_context(
            qemu_nbd.export(self.opts, depth=True, connect=False))
        try:
            prepare_destination(dst_db, dst_rows, True, cluster_layout(src_db, src_rows[-1]),
                                lambda: None)
        except Exception:  # noqa: BLE001 - made again in the layer's turn, or reported there
            return src, False
        return src, True

    def take(self, beat) -> tuple[qemu_nbd.Export | None, bool]:
        """(the source's export, started, or None; whether the destination was made)."""
        while concurrent.futures.wait([self._job], timeout=0.25).not_done:
            beat()
        return (None, False) if self._job.exception() is not None else self._job.result()

    def close(self) -> None:
        # The export first, its thread after: a child's parent-death signal follows the
        # thread that started it (prctl(2)), so its qemu-nbd would be killed mid-use.
        concurrent.futures.wait([self._job])
        self._exports.close()
        self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _writer(ctx, opts: str, report):
    """The destination's writable qemu-nbd, once any lock a killed writer held is let go."""
    exp = qemu_img.lock_waited(lambda: qemu_nbd.Export(opts, writable=True).open(), ctx.wait,
                               on_wait=lambda: report.waiting("image-locked"))
    try:
        yield exp
    finally:
        exp.close()


@contextlib.contextmanager
def _sink(ctx, opts: str, path: str, *, file: bool, start: int, hasher, report, punch: bool):
    """Where the copy writes (agent/storage/copy/sink.py), once the prefix an earlier life
    wrote is handed to the hasher. A raw destination (`file`) is written by this worker
    itself, its prefix read back through a read-only qemu-nbd (qemu takes no lock on a raw
    file that a killed writer's would refuse: docs/crash-model.md)."""
    if not file:
        with _writer(ctx, opts, report) as exp:
            if hasher is not None and start:
                nbd.hash_prefix(exp, start, hasher, ctx.check)
            yield sink.NbdSink(exp, punch)
        return
    if hasher is not None and start:
        with qemu_nbd.export(opts) as exp:
            nbd.hash_prefix(exp, start, hasher, ctx.check)
    out = sink.FileSink(path, punch=punch, direct=qemu_img.direct_io(path))
    try:
        yield out
    finally:
        out.close()


def move(ctx, *, src_db, src_rows, dst_db, dst_rows, start: int, fresh: bool, layer: bool,
         report, record: bool, merge: bool = False, punch: bool = True,
         inherited: list[bytes] | None = None, keep_blocks: bool = False,
         holds_nothing: bool = False, ahead: Ahead | None = None,
         on_copying=lambda: None) -> tuple[str | None, int, list[bytes] | None]:
    """Copy the guest view of src_rows[-1] (layer: only what it holds itself) into
    dst_rows[-1]; returns (checksum, where the copy started, its block digests if
    `keep_blocks` and the disk is not too large to keep them). ``merge``: dst_rows[-1] is
    src_rows[-1]'s parent, whose own data the caller checked and which is never made
    again (workers/ops/merge.py). ``punch`` False: zeros are written, never punched.
    ``inherited``: a layer's parent's block digests, kept by this worker when it copied
    the parent (nbd.copy_image), so the blocks the layer holds nothing of are not read.
    ``holds_nothing``: nothing in what is copied (a whole chain: no data in any layer,
    sizing.holds_nothing; a chain copy's layer: not a cluster of its own, qcow2.maps_nothing):
    a fresh destination, which reads as the source already (zeros; a layer: its parent's
    copy beneath it), is left as made, and nothing is read; the checksum is of zeros, or a
    layer's its parent's digests (`inherited`; without them, and a checksum to record, the
    layer is copied as any other). An empty 8 TiB disk costs its destination's making and
    its blocks' digests, never a walk of its tables. ``ahead``: what was begun for this
    layer while the one before it copied (Ahead), taken over and closed here;
    ``on_copying()``: called once the data moves (a chain copy begins its next layer)."""
    before = _files(src_db, src_rows)  # headers: checked by the caller, before its answer
    src_opts = source_opts(src_db, src_rows, share=merge)
    size = src_rows[-1]["size"]
    parent_size = src_rows[-2]["size"] if layer and len(src_rows) > 1 else 0
    if inherited is not None and len(inherited) != -(-parent_size // checksum.BLOCK):
        inherited = None  # not the parent's whole guest view: read as if unknown
    as_parent = layer and inherited is not None and parent_size == size
    empty = holds_nothing and not merge and (not layer or as_parent or not record)
    with contextlib.ExitStack() as stack:
        begun, made = _taken(stack, ahead, src_opts, ctx.beat)
        # The source's qemu-nbd starts while the destination is made and opened (each qemu
        # process takes 10-15 ms to start); it is connected to once both are ready. An
        # empty source's zero blocks are hashed meanwhile instead.
        src = None if empty else begun or stack.enter_context(
            qemu_nbd.export(src_opts, depth=layer, connect=False))
        zeros = _zero_hasher(stack, size, keep_blocks) \
            if empty and not layer and record and start == 0 else None
        dst_fresh = False if merge else True if fresh and made else _prepared(
            ctx, src_db, src_rows, dst_db, dst_rows, fresh, report)
        if dst_fresh and not fresh:
            start = 0
        # An empty source's destination an earlier life made may hold what it wrote: that
        # one is copied as any other (its holes written as zeros).
        if empty and dst_fresh:
            report.progress(size, 0)
            digest, blocks = _left_as_made(stack, size, record, keep_blocks, zeros,
                                           inherited if layer else None, ctx.beat)
        else:
            src = src or stack.enter_context(
                qemu_nbd.export(src_opts, depth=layer, connect=False))
            digest, blocks = _transfer(
                ctx, src, src_rows, dst_db, dst_rows, start=start, fresh=dst_fresh,
                layer=layer, report=report, record=record, merge=merge, punch=punch,
                inherited=inherited, parent_size=parent_size, keep_blocks=keep_blocks,
                on_copying=on_copying)
    check_files(src_db, src_rows, before)
    return digest, start, blocks


def _taken(stack: contextlib.ExitStack, ahead: Ahead | None, src_opts: str, beat) -> tuple:
    """What was begun for this copy (Ahead.take), closed with `stack`: (None, False) if
    nothing was, or it was begun for another source than this copy reads."""
    if ahead is None:
        return None, False
    stack.callback(ahead.close)
    return ahead.take(beat) if ahead.opts == src_opts else (None, False)


def _prepared(ctx, src_db, src_rows, dst_db, dst_rows, fresh: bool, report) -> bool:
    """prepare_destination, once a lock a killed life's qemu-nbd may still hold on the
    destination is let go."""
    cluster = cluster_layout(src_db, src_rows[-1]) if dst_rows[-1]["format"] == "cow" else {}
    return qemu_img.lock_waited(lambda: prepare_destination(
        dst_db, dst_rows, fresh, cluster, ctx.beat, restart=lambda: report.checkpoint(0)),
        ctx.wait, on_wait=lambda: report.waiting("image-locked"))


def _zero_hasher(stack: contextlib.ExitStack, size: int, keep_blocks: bool = False):
    """The checksum of `size` bytes of zeros, hashed on a thread of its own from now."""
    hasher = checksum.StreamFollower(size, keep_blocks=keep_blocks and size <= KEEP_MAX)
    stack.callback(hasher.cancel)
    hasher.zeros(size)
    return hasher


def _left_as_made(stack, size: int, record: bool, keep_blocks: bool, zeros,
                  inherited: list[bytes] | None, beat) -> tuple[str | None, list | None]:
    """(checksum, block digests) of a destination that reads as its source as made: a
    layer's are its parent's (`inherited`), a whole disk's those of zeros."""
    if not record:
        return None, None
    if inherited is not None:
        hasher = checksum.StreamHasher(size, keep_blocks=keep_blocks and size <= KEEP_MAX)
        hasher.known(inherited)
        return hasher.hexdigest(), hasher.blocks
    zeros = zeros or _zero_hasher(stack, size, keep_blocks)
    return zeros.result(beat), zeros.blocks()


def _transfer(ctx, src, src_rows, dst_db, dst_rows, *, start: int, fresh: bool, layer: bool,
              report, record: bool, merge: bool, punch: bool, inherited: list[bytes] | None,
              parent_size: int, keep_blocks: bool,
              on_copying) -> tuple[str | None, list[bytes] | None]:
    """move's bytes: the destination opened, `src` (started) connected, the copy run and
    hashed; (checksum, block digests). `inherited`: move's, the parent's whole view's."""
    dst_path = dst_db.layout.data_path(dst_rows[-1])
    # O_DIRECT unless the size is not one of the storage's blocks: qemu cannot then open
    # the destination for writing (a cow source's size is only a multiple of 512).
    dst_opts = chain.image_opts(dst_db.layout, dst_rows, direct=qemu_img.direct_io(dst_path)
                                and dst_rows[-1]["size"] % 4096 == 0)
    size = src_rows[-1]["size"]
    cfg = ctx.settings.get("copy", {})
    hasher = checksum.StreamFollower(size, keep_blocks=keep_blocks and size <= KEEP_MAX) \
        if record else None
    try:
        with _sink(ctx, dst_opts, dst_path, file=dst_rows[-1]["format"] == "raw",
                   start=start, hasher=hasher, report=report, punch=punch) as dst:
            if src.connect().size() < size:
                raise errors.VolumeTruncated("the source's guest view is shorter than its size",
                                             size=size, data_bytes=src.size())
            on_copying()
            try:
                nbd.copy_image(
                    src, dst, start, size, layer=layer, fresh=fresh, hasher=hasher,
                    checkpoint=report.checkpoint, progress=report.progress,
                    should_stop=ctx.stop_requested,
                    checkpoint_bytes=cfg.get("checkpoint_bytes", 256 << 20),
                    checkpoint_seconds=cfg.get("checkpoint_seconds", 1.0),
                    inherited=inherited, parent_size=parent_size)
            except CopyStopped:  # durable and checkpointed up to where it stopped
                raise Stopped() from None
            src.disconnect()  # read whole: it exits while the destination's is waited for
        digest = hasher.result() if hasher is not None else None
        blocks = hasher.blocks() if hasher is not None else None
        hasher = None
    finally:
        if hasher is not None:
            hasher.cancel()
    return digest, blocks
