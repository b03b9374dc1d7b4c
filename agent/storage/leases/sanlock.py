"""Volume leases held with sanlock: disk-paxos leases on the shared storage itself.

Each domain is a sanlock lockspace named by its UUID, kept in `dom_md/ids` (one 512-byte
sector per host ID, 2000 host IDs: 1 MiB); each volume's lease is a sanlock resource named
by its UUID, in its own 1 MiB file `leases/<volumeID>.sanlock`, as VDSM does for file
domains. Both are made on first use by whichever host needs them, atomically (written
aside, then hard-linked into place: of two hosts racing, one link wins and the other uses
it), so a domain made by any agent can be attached by any host.

A lease is acquired by the worker that writes, registered with the sanlock daemon as that
process: the daemon frees it the moment the worker dies, and kills the worker if its host
loses the lockspace (cannot renew its host ID in time) - the writer is fenced, which an OFD
lock cannot do. Who holds a lease is sanlock's answer (owner host ID and generation, and
whether that host is alive), with an advisory record (`<volumeID>.holder`: task, pid, op)
written by the holder for people.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid

from agent import errors, logs
from agent.storage.layout import DOM_MD
from agent.storage.leases import local
from agent.system import fsync_dir, while_beating

AREA = 1 << 20  # bytes of an ids or a lease area (sanlock's default alignment)
TMP_SUFFIX = ".tmp"
# A tmp file this old is nobody's work in progress (writing one takes well under a second;
# another host's may be in progress now, so fresh ones are left alone).
STALE_SECONDS = 3600.0


def sweep_stale(directory: str, now: float | None = None) -> list[str]:
    """Remove the tmp files `_make_atomic` left in `directory` (a SIGKILL between writing
    and linking) once they are STALE_SECONDS old; the names removed. Only names of its own
    pattern (<name>.<32 hex>.tmp) are touched."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.endswith(TMP_SUFFIX):
            continue
        stem, _, token = name[:-len(TMP_SUFFIX)].rpartition(".")
        if not (stem and len(token) == 32 and all(c in "0123456789abcdef" for c in token)):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime >= STALE_SECONDS:
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:  # another host swept it first
            continue
    return removed


log = logs.get(component="leases")
_registered: int | None = None  # this process's registration (one per process)


def _sanlock():
    try:
        import sanlock
    except ImportError:
        raise errors.OperationFailed("sanlock's Python binding is missing (Debian: "
                                     "python3-sanlock)", reason="missing-tool") from None
    return sanlock


def _idle() -> None:
    """No heartbeat to give (the supervisor's own calls)."""


def _failed(what: str, exc, **data) -> errors.AgentError:
    code = getattr(exc, "errno", None)
    return errors.OperationFailed(f"sanlock: {what}: {exc}", sanlock_errno=code, **data)


def _make_atomic(path: str, write) -> None:
    """Make `path` (a 1 MiB area) by `write(tmp)` beside it and a hard link: never half-made,
    and never over another host's. A SIGKILL between the two leaves the tmp file behind:
    `sweep_stale` removes it later."""
    if os.path.exists(path):
        return
    tmp = f"{path}.{uuid.uuid4().hex}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
    try:
        os.ftruncate(fd, AREA)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        write(tmp)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(path))


class SanlockLease:
    def __init__(self, manager: "SanlockLeases", volume_id: str, disks: list):
        self.manager, self.volume_id, self.disks = manager, volume_id, disks

    def release(self, patience: float = 5.0) -> None:
        """Let the lease go, waiting at most `patience` seconds: a daemon that does not
        answer (a host cut off) must not hang the worker, whose exit frees the lease."""
        if self.disks is None:
            return
        sl = _sanlock()
        disks, self.disks = self.disks, None

        def release() -> bool:
            sl.release(self.manager.lockspace, self.volume_id.encode(), disks,
                       slkfd=_registered)
            return True
        try:
            let_go = while_beating(self.manager.beat or _idle, release, patience=patience)
        except sl.SanlockException:
            let_go = True  # gone with its lockspace, or freed already: nothing is held
        if not let_go:
            return  # the daemon did not answer: held until this process exits, unrecorded
        # After the release, never before, and only on our own record (another host may
        # hold it by now): "released" proves nobody holds the lease, which lets a damaged
        # area be made again (SanlockLeases._repair).
        record = self.manager._read_record(self.volume_id)
        if (record.get("pid"), record.get("sanlock_host_id")) == (os.getpid(),
                                                                   self.manager.host_id):
            self.manager._write_record(self.volume_id, {**record, "released": time.time()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class SanlockLeases:
    name = "sanlock"

    def __init__(self, layout, domain_id: str, host_id: int, io_timeout: int,
                 beat=lambda: None):
        self.layout, self.host_id, self.io_timeout = layout, host_id, io_timeout
        self.beat = beat  # the worker's heartbeat, called while a call waits on the daemon
        self.lockspace = domain_id.encode()
        self.ids = os.path.join(layout.root, DOM_MD, "ids")

    # -- the lockspace (this host's membership of the domain) ------------------------------

    def ensure_lockspace(self) -> None:
        sl = _sanlock()
        os.makedirs(os.path.dirname(self.ids), 0o755, exist_ok=True)
        try:
            _make_atomic(self.ids, lambda tmp: sl.write_lockspace(
                self.lockspace, tmp, iotimeout=self.io_timeout))
        except sl.SanlockException as exc:
            raise _failed("cannot lay out the domain's lockspace", exc) from None

    def joined(self) -> bool:
        sl = _sanlock()
        try:
            return bool(sl.inq_lockspace(self.lockspace, self.host_id, self.ids))
        except sl.SanlockException:
            return False

    def join(self, beat=lambda: None) -> dict:
        """Join the domain's lockspace with this host's ID; returns once joined. Takes
        seconds (longer after an unclean stop: sanlock waits out the ID's last owner);
        `beat` is called meanwhile and may raise to stop waiting (the add goes on in the
        daemon, and the next join finds it). Leftover tmp files of areas made by a life that
        was killed are swept first (`swept`: how many)."""
        sl = _sanlock()
        self.ensure_lockspace()
        swept = sum(len(sweep_stale(d)) for d in (os.path.dirname(self.ids),
                                                  self.layout.leases_dir))
        began = time.monotonic()
        if self.joined():
            return {"host_id_number": self.host_id, "seconds": 0.0, "already": True,
                    "swept": swept}
        try:
            while_beating(beat or _idle, sl.add_lockspace, self.lockspace, self.host_id,
                          self.ids, iotimeout=self.io_timeout)
        except sl.SanlockException as exc:
            # EEXIST: joined meanwhile (an add of an earlier life finished first).
            if exc.errno != 17 or not self.joined():
                raise _failed("cannot join the lockspace", exc,
                              host_id_number=self.host_id) from None
        return {"host_id_number": self.host_id,
                "seconds": round(time.monotonic() - began, 3), "already": False,
                "swept": swept}

    # -- volume leases -----------------------------------------------------------------

    def _disks(self, volume_id: str) -> list:
        return [(os.path.join(self.layout.leases_dir, volume_id + ".sanlock"), 0)]

    def _ensure_resource(self, volume_id: str) -> list:
        sl = _sanlock()
        disks = self._disks(volume_id)
        try:
            _make_atomic(disks[0][0], lambda tmp: sl.write_resource(
                self.lockspace, volume_id.encode(), [(tmp, 0)]))
        except sl.SanlockException as exc:
            raise _failed("cannot lay out the volume's lease", exc, volumeID=volume_id) \
                from None
        return disks

    def acquire(self, volume_id: str, holder: dict) -> SanlockLease:
        """Held by this process until released or it dies; LeaseHeld (data.holder) if
        another process of any host holds it."""
        global _registered
        sl = _sanlock()
        self.layout.lease_path(volume_id)  # checks the ID and the path
        disks = self._ensure_resource(volume_id)
        try:
            if _registered is None:
                _registered = sl.register()
            if not self._area_sound(volume_id):
                self._repair(volume_id)
            while_beating(self.beat or _idle, sl.acquire, self.lockspace, volume_id.encode(),
                          disks, slkfd=_registered)
        except sl.SanlockException as exc:
            if exc.errno == errno.ENOSPC:  # sanlock's word for "no such lockspace here"
                raise errors.DomainUnusable(
                    "this host holds no lockspace in the domain", reason="lockspace",
                    lockspace="lost", domainID=self.lockspace.decode(),
                    volumeID=volume_id) from None
            owner = self.probe(volume_id)
            if owner and owner.get("sanlock"):
                raise errors.LeaseHeld("the volume's lease is held", volumeID=volume_id,
                                       holder=owner) from None
            if exc.errno in (errno.EEXIST, errno.EBUSY):  # in this daemon's own lists:
                # another process of this host holds it (EEXIST), or one that released it or
                # died and whose release is not done yet (EBUSY; the fleet suite met it)
                raise errors.LeaseHeld("the volume's lease is held by a process of this host "
                                       "(or is being released after its death)",
                                       volumeID=volume_id, holder=owner) from None
            raise _failed("cannot acquire the volume's lease", exc, volumeID=volume_id) \
                from None
        owners = self._owners(volume_id)
        record = {**holder, "since": time.time(), "sanlock_host_id": self.host_id,
                  "sanlock_generation": owners[0]["generation"] if owners else None}
        self._write_record(volume_id, record)
        return SanlockLease(self, volume_id, disks)

    def _area_sound(self, volume_id: str) -> bool:
        """Whether the volume's lease area reads as this volume's resource in this domain's
        lockspace (a damaged, cleared or foreign area does not)."""
        sl = _sanlock()
        try:
            found = sl.read_resource(self._disks(volume_id)[0][0], 0)
        except sl.SanlockException:
            return False
        return found.get("lockspace") == self.lockspace and \
            found.get("resource") == volume_id.encode()

    def _repair(self, volume_id: str) -> None:
        """A damaged lease area would make its volume unusable (and undeletable) for ever.
        Nobody can acquire a damaged area, so only a holder from before the damage could
        hold it: the area is made again, in place, when the last holder's record proves it
        let go (released, or its process or host is dead), under an OFD lock that keeps two
        repairers from racing. OperationFailed (reason lease-damaged) when it cannot prove."""
        sl = _sanlock()
        path = self._disks(volume_id)[0][0]
        with local.acquire(path + ".repair", {"op": "repair", "pid": os.getpid()}):
            if self._area_sound(volume_id):
                return  # another host made it again meanwhile
            record = self._read_record(volume_id)
            holder = self._possible_holder(record)
            if holder is not None:
                raise errors.OperationFailed(
                    "the volume's lease area is damaged and its last holder may still hold "
                    "it", volumeID=volume_id, reason="lease-damaged", holder=holder)
            try:
                sl.write_resource(self.lockspace, volume_id.encode(), [(path, 0)])
            except sl.SanlockException as exc:
                raise _failed("cannot make the volume's lease area again", exc,
                              volumeID=volume_id) from None
            fsync_dir(os.path.dirname(path))
            log.warning("lease_area_rebuilt", volume_id=volume_id, last_holder=record or None)

    def _possible_holder(self, record: dict) -> dict | None:
        """The last holder, unless its record proves it let go or died."""
        if not record or record.get("released"):
            return None
        host, gen = record.get("sanlock_host_id"), record.get("sanlock_generation")
        if host == self.host_id and isinstance(record.get("pid"), int) and \
                not _pid_alive(record["pid"]):
            return None  # ours, and gone: its daemon freed what it held
        if isinstance(host, int) and isinstance(gen, int) and self._alive(host, gen) is False:
            return None  # its host died (or came back as a new generation)
        return {k: record.get(k) for k in ("host_id", "pid", "task_id", "sanlock_host_id",
                                           "sanlock_generation")}

    def _read_record(self, volume_id: str) -> dict:
        try:
            with open(self._record_path(volume_id)) as f:
                record = json.loads(f.read(64 * 1024))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _record_path(self, volume_id: str) -> str:
        return os.path.join(self.layout.leases_dir, volume_id + ".holder")

    def _write_record(self, volume_id: str, record: dict) -> None:
        path = self._record_path(volume_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):  # advice for people: never fails the lease
            with open(tmp, "w") as f:
                json.dump(record, f)
            os.replace(tmp, path)

    def _owners(self, volume_id: str) -> list[dict]:
        sl = _sanlock()
        disks = self._disks(volume_id)
        if not os.path.exists(disks[0][0]):
            return []
        try:
            return sl.read_resource_owners(self.lockspace, volume_id.encode(), disks)
        except sl.SanlockException:
            return []

    def _alive(self, host_id: int, generation: int) -> bool | None:
        """Whether the owner host is alive, as this host's daemon sees the lockspace; None
        if this host is not in it."""
        sl = _sanlock()
        try:
            hosts = sl.get_hosts(self.lockspace, host_id)
        except sl.SanlockException:
            return None
        for h in hosts:
            if h.get("host_id") == host_id:
                if h.get("generation") not in (None, generation):
                    return False  # the host came back since: that owner is dead
                return h.get("flags") in (sl.HOST_LIVE, sl.HOST_UNKNOWN)
        return False

    def probe(self, volume_id: str) -> dict | None:
        """{holder record..., live, sanlock: {host_id, generation, live}} for a held lease;
        the last holder's record with live False for a free one; None if never held."""
        self.layout.lease_path(volume_id)  # checks the ID and the path
        record = self._read_record(volume_id)
        owners = self._owners(volume_id)
        if not owners:
            return {**record, "live": False} if record else None
        owner = owners[0]
        live = self._alive(owner["host_id"], owner["generation"])
        mine = (record.get("sanlock_host_id"), record.get("sanlock_generation")) == (
            owner["host_id"], owner["generation"])
        out = record if mine else {}
        return {**out, "live": bool(live), "sanlock": {
            "host_id": owner["host_id"], "generation": owner["generation"], "live": live}}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
