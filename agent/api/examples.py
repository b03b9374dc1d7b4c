"""One example request and response per verb, rendered into docs/api.md by agent/api/apidoc.py.

Each entry: the request's "params" (None: no params), and its "result" or its "error". An
optional "id" is the request's id (the task's ID), "1" if absent. tests/e2e/test_api_examples.py
checks that every served verb has one, that its params pass the verb's own validator, that
an error names a real error, and that results have the shape a real agent answers with.
"""

from __future__ import annotations

DOMAIN = "5a8e0c64-1f61-4b52-9d51-3b8e2f6d7c10"
IMAGE = "0e7a3c55-4a0f-4d8e-a0f7-9c1b2d3e4f50"
VOLUME = "7d2f1b9a-6c3e-4e5d-8f70-1a2b3c4d5e60"
DST_IMAGE = "c3d4e5f6-a7b8-4c9d-8e0f-112233445566"
DST_VOLUME = "9b8a7c6d-5e4f-4a3b-9c2d-1e0f2a3b4c5d"
OPERATION = "2f4e6a8c-0b1d-4e3f-a5b7-c9d1e3f5a7b9"
BOOT = "6693315bd67b4ddfabc965a18f16dd67"
SRC = {"domainID": DOMAIN, "imageID": IMAGE, "volumeID": VOLUME}
DST = {"domainID": DOMAIN, "imageID": DST_IMAGE, "volumeID": DST_VOLUME}
GiB = 1 << 30

_LEASE = {"host_id": "host-a", "op": "copy", "pid": 28412, "since": 1767225600.5,
          "task_id": "copy-1", "live": True}
_RECORD = {"id": "copy-1", "method": "Image.copy", "state": "running", "progress": 42.5,
           "returned": True, "result": {"volumeID": DST_VOLUME, "state": "copying",
                                        "generation": 0, "copied": 0, "total": GiB,
                                        "attempts": 1, "failures": 0},
           "error": None, "created": 1767225600.1, "started": 1767225600.2, "ended": None}
_VOLUME = {**SRC, "format": "raw", "size": GiB, "allocated": 536870912, "legality": "LEGAL",
           "generation": 0, "parent": None, "children": [], "leaf": True,
           "path": f"/srv/hostagent/domain1/images/{IMAGE}/{VOLUME}.raw"}
_SNAPSHOT = "4c5d6e7f-8091-4a2b-9c3d-4e5f60718293"
_CHAIN = [{**_VOLUME, "children": [_SNAPSHOT], "leaf": False},
          {**_VOLUME, "volumeID": _SNAPSHOT, "format": "cow", "allocated": 10682368,
           "parent": VOLUME, "path": f"/srv/hostagent/domain1/images/{IMAGE}/{_SNAPSHOT}.qcow2"}]
_DOMAIN_INFO = {"domainID": DOMAIN, "path": "/srv/hostagent/domain1", "capacity": 270553174016,
                "free": 81832734720, "volumes": 3, "copies": 1}
_OPERATION = {"domainID": DOMAIN, "operationID": OPERATION, "type": "scrub",
              "state": "STARTED", "progress": 26.5, "host_id": "host-a", "task_id": "scrub-1",
              "pid": 29647, "started": 1767225600.3, "updated": 1767225602.9, "ended": None,
              "stop_requested": None, "result": None, "error": None}


_SOCKET = "/run/hostagent/exports/30211-k2x8wq1e/sock"
_EXPORT = {**DST, "mode": "write", "url": f"nbd+unix:///?socket={_SOCKET}", "socket": _SOCKET,
           "imageio_url": f"nbd:unix:{_SOCKET}", "size": GiB, "format": "raw",
           "volume_format": "cow", "generation": 0, "inactivity_timeout": 300.0,
           "max_connections": 8}
_CHECKSUM = "blake3-4m:" + "5f0e" * 16
_FINISHED = {"volumeID": DST_VOLUME, "legality": "LEGAL", "generation": 2,
             "checksum": _CHECKSUM, "size": GiB, "format": "cow", "already": False}


def _error(code: int, name: str, message: str, **data) -> dict:
    return {"code": code, "message": message, "data": {**data, "name": name}}


EXAMPLES: dict[str, dict] = {
    "Bitmap.add": {"params": {**SRC, "name": "checkpoint-7"}, "result": {
        "volumeID": VOLUME, "name": "checkpoint-7", "granularity": 65536, "added": True,
        "already": False}},
    "Bitmap.remove": {"params": {**SRC, "name": "checkpoint-6"}, "result": {
        "volumeID": VOLUME, "name": "checkpoint-6", "removed": True}},
    "Bitmap.clear": {"params": SRC, "result": {"volumeID": VOLUME,
                                                "removed": ["checkpoint-6", "checkpoint-7"]}},
    "Bitmap.list": {"params": SRC, "result": {"volumeID": VOLUME, "bitmaps": [
        {"name": "checkpoint-6", "state": "broken", "reason": "in-use", "granularity": 65536,
         "continues": False, "in_image": True},
        {"name": "checkpoint-7", "state": "ok", "reason": None, "granularity": 65536,
         "continues": True, "in_image": True}]}},
    "Debug.crash": {"params": None, "error": _error(-32603, "InternalError", "internal error")},
    "Debug.fault": {"params": {"where": "timer"}, "result": True},
    "Debug.sleep": {"params": {"seconds": 0.5}, "result": {"slept": 0.5}},
    "Host.getCapabilities": {"params": None, "result": {
        "version": "0.1.0", "host_id": "host-a", "boot_id": BOOT,
        "kernel_boot_id": "50d1b009-1ac6-435a-89a8-0d6bc4266563",
        "task_states": ["pending", "running", "done", "failed", "aborting", "aborted"],
        "methods": [{"name": "Host.ping", "params": [],
                     "doc": "Answer true: the agent is up and its loop is turning.",
                     "runs_in": "supervisor"}]}},
    "Host.getStats": {"params": None, "result": {
        "cpu_percent": 12.5, "cpu_count": 2,
        "memory": {"total": 25276502016, "available": 24349573120, "percent": 3.7},
        "load": [0.52, 0.61, 0.58], "uptime_seconds": 3935.1,
        "agent": {"pid": 28039, "rss_bytes": 36237312, "uptime_seconds": 37.5,
                  "boot_id": BOOT, "callback_errors": 0, "ready": True,
                  "started": 1764590000.5, "ready_since": 1764590000.6,
                  "metrics": "http://127.0.0.1:9478/metrics"},
        "workers_running": 1, "workers": [{"taskID": "copy-1", "op": "image.copy",
                                           "pid": 28412}],
        "forkserver_pid": 28054,
        "tasks": {"pending": 0, "running": 1, "done": 24, "failed": 0, "aborting": 0,
                  "aborted": 0},
        "copies": [{"taskID": "copy-1", "domainID": DOMAIN, "imageID": DST_IMAGE,
                    "volumeID": DST_VOLUME, "copied": 456130560, "total": GiB,
                    "rate": 402653184, "seconds": 1.2}],
        "backlog": 0, "lockspace_waiting": 0,
        "limits": {
            "descriptors": {"limit": 524288, "in_use": 31, "peers": 3, "listening": True,
                            "pauses": 0, "refused_workers": 0},
            "rpc": {"unread_reply_bytes": 0, "clients_with_unread_replies": 0,
                    "replies_refused": 0, "replies_dropped": 0, "messages_dropped": 0},
            "events": {"published": 1204, "dropped": 0, "oversized": 0},
            "workers": {"strangers": 0, "misbehaved": 0}}}},
    "Export.finish": {"id": "finish-1", "params": {**DST, "checksum": _CHECKSUM},
                      "result": _FINISHED},
    "Export.start": {"id": "upload-1", "params": {**DST, "mode": "write", "tag": "disk1.qcow2",
                                                  "create": {"size": GiB, "format": "cow"}},
                     "result": _EXPORT},
    "Export.stop": {"id": "finish-1", "params": {"taskID": "upload-1", "finish": True,
                                                 "checksum": _CHECKSUM}, "result": _FINISHED},
    "Host.ping": {"params": None, "result": True},
    "Image.copy": {"id": "copy-1", "params": {"src": SRC, "dst": DST}, "result": {
        "volumeID": DST_VOLUME, "state": "copying", "generation": 0, "copied": 0,
        "total": GiB, "attempts": 1, "failures": 0}},
    "Image.checksum": {"params": {**SRC, "algorithm": "blake2b"}, "result": {
        "algorithm": "blake2b", "block_size": 4194304, "size": GiB,
        "checksum": "9a41" * 16}},
    "Image.getInfo": {"params": {"domainID": DOMAIN, "imageID": IMAGE}, "result": {
        "domainID": DOMAIN, "imageID": IMAGE, "chain": _CHAIN, "chains": [_CHAIN],
        "merges": []}},
    "Image.merge": {"id": "merge-1", "params": {
        "domainID": DOMAIN, "imageID": IMAGE, "baseVolumeID": VOLUME,
        "topVolumeID": _SNAPSHOT}, "result": {
        "volumeID": VOLUME, "baseVolumeID": VOLUME, "topVolumeID": _SNAPSHOT,
        "state": "merging", "step": "commit", "generation": 1, "copied": 0, "total": GiB,
        "attempts": 1, "failures": 0}},
    "Image.getStatus": {"params": DST, "result": {
        "domainID": DOMAIN, "imageID": DST_IMAGE, "volumeID": DST_VOLUME,
        "legality": "ILLEGAL", "generation": 0, "size": GiB,
        "copy": {"source": SRC, "copied": 456130560, "total": GiB, "percent": 42.48,
                 "state": "copying", "generation": 0, "attempts": 1, "failures": 0,
                 "errors": [],
                 "started": 1767225600.2, "updated": 1767225607.4, "host_id": "host-a",
                 "task_id": "copy-1", "lease": _LEASE}, "transfer": None, "merge": None}},
    "StorageDomain.attach": {"params": {"domainID": DOMAIN, "path": "/srv/hostagent/domain1"},
                             "result": _DOMAIN_INFO},
    "StorageDomain.create": {"params": {"domainID": DOMAIN, "path": "/srv/hostagent/domain1"},
                             "result": {**_DOMAIN_INFO, "volumes": 0, "copies": 0}},
    "StorageDomain.getInfo": {"params": {"domainID": DOMAIN}, "result": _DOMAIN_INFO},
    "StorageDomain.getOperationStatuses": {"params": {"domainID": DOMAIN}, "result": {
        "domainID": DOMAIN, "operations": [_OPERATION]}},
    "StorageDomain.list": {"params": None, "result": [
        {"domainID": DOMAIN, "path": "/srv/hostagent/domain1", "attached_by": "config",
         "lockspace": "joined", "error": None}]},
    "StorageDomain.startScrub": {"id": "scrub-1", "params": {"domainID": DOMAIN,
                                                             "operationID": OPERATION},
                                 "result": {**_OPERATION, "progress": 0.0,
                                            "launcher": "spawn"}},
    "StorageDomain.stopOperation": {"params": {"domainID": DOMAIN, "operationID": OPERATION},
                                    "result": {**_OPERATION, "stop_requested": 1767225603.0}},
    "Task.abort": {"params": {"taskID": "copy-1"}, "result": {**_RECORD, "state": "aborting"}},
    "Task.getAll": {"params": {"states": ["running"]}, "result": [_RECORD]},
    "Task.getStatus": {"params": {"taskID": "copy-1"}, "result": _RECORD},
    "Volume.create": {"params": {**SRC, "size": GiB, "format": "cow"}, "result": {
        **_VOLUME, "format": "cow", "allocated": 196608,
        "path": f"/srv/hostagent/domain1/images/{IMAGE}/{VOLUME}.qcow2",
        "lease": {**_LEASE, "op": "create", "task_id": "1", "live": False},
        "transfer": None}},
    "Volume.delete": {"params": SRC, "result": {"volumeID": VOLUME, "deleted": True}},
    "Volume.fence": {"params": {**SRC, "generation": 3}, "result": {
        "volumeID": VOLUME, "generation": 4, "fenced": True, "waited": 71.204}},
    "Volume.extend": {"params": {**SRC, "size": 2 * GiB}, "result": {
        "volumeID": VOLUME, "size": 2 * GiB, "generation": 1, "extended": True}},
    "Volume.measure": {"params": {**SRC, "format": "cow"}, "result": {
        "volumeID": VOLUME, "format": "cow", "size": GiB, "required": 537264128,
        "fully_allocated": 1074135040}},
    "Volume.getInfo": {"params": SRC, "result": {**_VOLUME, "generation": 1, "lease": None,
                                                 "transfer": None}},
}
