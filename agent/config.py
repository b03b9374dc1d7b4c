"""Configuration: a TOML file over an embedded default that works for a newcomer.

Unknown keys are an error, so a typo never silently falls back to a default. `{run_dir}` in
an endpoint expands to the run directory, so ipc endpoints can follow it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import InvalidParams
from agent.ids import check_uuid

DEFAULT_RPC_PORT = 5670
DEFAULT_EVENTS_PORT = 5671
DEFAULT_METRICS_PORT = 9478

DEFAULTS: dict[str, Any] = {
    "host_id": None,  # the hostname
    "run_dir": None,  # $XDG_RUNTIME_DIR/hostagent, else ~/.local/state/hostagent/run
    "debug": False,
    "rpc": {
        "endpoints": [f"tcp://127.0.0.1:{DEFAULT_RPC_PORT}", "ipc://{run_dir}/rpc.sock"],
        "max_message_bytes": 16 * 1024 * 1024,
        "max_active_tasks": 256,
        "max_batch_length": 1000,
        # What a client that does not read its replies can cost (agent/wire/replies.py): this
        # many queued replies, and this many bytes of large ones.
        "max_queued_replies": 1000,
        "max_unread_reply_bytes": 64 * 1024 * 1024,
    },
    "events": {
        "endpoints": [f"tcp://127.0.0.1:{DEFAULT_EVENTS_PORT}", "ipc://{run_dir}/events.sock"],
        # What a subscriber that does not read can cost (agent/wire/events.py).
        "max_queued": 10000,
        "max_event_bytes": 16384,
    },
    "tasks": {"retain_seconds": 3600.0, "retain_max": 10000},
    "workers": {
        # A worker reports at least every heartbeat_seconds; silent past deadline_seconds it
        # is killed (SIGTERM, then SIGKILL after kill_grace_seconds) and its task failed.
        "heartbeat_seconds": 1.0,
        "deadline_seconds": 30.0,
        "kill_grace_seconds": 5.0,
    },
    # lease_manager: "local" (an OFD lock per volume: one host, tests, development) or
    # "sanlock" (disk-paxos leases on the shared storage, for hosts that share domains:
    # host_id_number is this host's ID in every domain's lockspace, 1..2000, unique among
    # the hosts sharing a domain, assigned by the engine; sanlock_run_dir picks the daemon,
    # empty for its default).
    "storage": {"domains": {}, "lease_manager": "local", "host_id_number": 0,
                "sanlock_io_timeout": 10, "sanlock_run_dir": ""},
    # CURVE on the RPC and events sockets: the server's secret key file and a directory of
    # authorized clients' public key files (both, or neither). See agent/wire/security.py.
    "security": {"server_secret_key": "", "authorized_keys_dir": ""},
    # max_running: how many tasks the agent issues itself (recovered and retried copies,
    # abandons) run at once; the rest wait, pending, in order (agent/supervisor/backlog.py).
    "recovery": {"copy_policy": "resume", "resume_foreign": False, "max_attempts": 3,
                 "backoff_seconds": 1.0, "max_running": 4},
    # max_bytes_per_second: 0 is unlimited; a limit keeps copies from starving VMs' I/O.
    "copy": {"chunk_bytes": 16 * 1024 * 1024, "checkpoint_bytes": 256 * 1024 * 1024,
             "checkpoint_seconds": 1.0, "max_bytes_per_second": 0,
             # Hash the destination behind the copy and record its checksum at completion,
             # so a scrub can tell later whether its data changed (agent/storage/checksum.py).
             "record_checksum": True},
    # Export.start's qemu-nbd servers (workers/ops/export.py): `group` may also open their
    # sockets (an ovirt-imageio daemon running as another user; "" for the agent's user only),
    # `max_connections` clients at once, and an export with no client for `inactivity_seconds`
    # (unless its request says otherwise) ends by itself.
    "exports": {"group": "", "max_connections": 8, "inactivity_seconds": 300.0},
    # A scrub reads every LEGAL volume of a domain; its reads are throttled (0: unlimited)
    # so that it does not starve copies and VMs. launcher: auto | spawn | systemd-run
    # (how the scrub process is started so that it outlives the agent: workers/ops/operation.py).
    "scrub": {"max_bytes_per_second": 64 * 1024 * 1024, "launcher": "auto"},
    # Prometheus metrics over HTTP (agent/supervisor/metrics.py): "host:port", loopback by default
    # (the metrics say what the host stores; expose them wider on purpose), "" for none.
    "metrics": {"endpoint": f"127.0.0.1:{DEFAULT_METRICS_PORT}"},
}

SCRUB_LAUNCHERS = ("auto", "spawn", "systemd-run")

COPY_POLICIES = ("resume", "restart", "abandon", "manual")

LEASE_MANAGERS = ("local", "sanlock")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    @property
    def host_id(self) -> str:
        return self.data["host_id"]

    @property
    def leases(self) -> dict:
        """The lease manager's settings as every worker gets them (the one place they are
        built: workers/runtime.py hands them to agent.storage.leases.configure)."""
        st = self.data["storage"]
        return {"manager": st["lease_manager"], "host_id_number": st["host_id_number"],
                "io_timeout": st["sanlock_io_timeout"], "run_dir": st["sanlock_run_dir"]}

    @property
    def run_dir(self) -> Path:
        return Path(self.data["run_dir"])


def default_run_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "hostagent"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "hostagent" / "run"


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        name = f"{where}{key}"
        if key not in base:
            raise ConfigError(f"unknown key {name!r}")
        if isinstance(base[key], dict) and key != "domains":
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} must be a table")
            out[key] = _merge(base[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _kinds(data: dict, defaults: dict = DEFAULTS, where: str = "") -> None:
    """A true-or-false key is TOML's true or false, a text key a string: `debug = "false"`
    (a non-empty string, so true) must not turn the debug verbs on, nor 0 stand for a key
    file. The keys the hostname and the default run dir stand in for (None) take a printable
    string of at most 4,096 characters ("": the default). Numbers and lists are checked by
    name below."""
    for key, default in defaults.items():
        value, name = data[key], f"{where}{key}"
        if isinstance(default, dict) and key != "domains":
            _kinds(value, default, f"{name}.")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        elif default is None and value is not None and not (
                isinstance(value, str) and len(value) <= 4096 and value.isprintable()):
            raise ConfigError(f"{name} must be a printable string")


def _check(data: dict) -> None:
    _kinds(data)

    def positive(path: str, value, kind=(int, float), maximum: float = 1e15):
        if isinstance(value, bool) or not isinstance(value, kind) or \
                not math.isfinite(value) or not 0 < value <= maximum:
            raise ConfigError(f"{path} must be a positive number (at most {maximum:g})")

    for section, keys in {"rpc": ["max_message_bytes", "max_active_tasks", "max_batch_length",
                                  "max_queued_replies", "max_unread_reply_bytes"],
                          "events": ["max_queued", "max_event_bytes"],
                          "tasks": ["retain_seconds", "retain_max"],
                          "workers": ["heartbeat_seconds", "deadline_seconds", "kill_grace_seconds"],
                          "copy": ["chunk_bytes", "checkpoint_bytes", "checkpoint_seconds"],
                          "exports": ["max_connections", "inactivity_seconds"]}.items():
        for key in keys:
            positive(f"{section}.{key}", data[section][key])
    for section in ("rpc", "events"):
        eps = data[section]["endpoints"]
        if not isinstance(eps, list) or not all(isinstance(e, str) for e in eps):
            raise ConfigError(f"{section}.endpoints must be a list of strings")
        for e in eps:
            try:
                check_endpoint(e, bind=True)
            except ValueError as exc:
                raise ConfigError(f"{section}.endpoints: {exc}") from None
    for section in ("copy", "scrub"):
        rate = data[section]["max_bytes_per_second"]
        if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
            raise ConfigError(f"{section}.max_bytes_per_second must be a non-negative integer")
    if not isinstance(data["exports"]["group"], str):
        raise ConfigError("exports.group must be a group's name or number, or \"\"")
    if not isinstance(data["exports"]["max_connections"], int) or \
            data["exports"]["max_connections"] > 64:
        raise ConfigError("exports.max_connections must be an integer, 1..64")
    if data["scrub"]["launcher"] not in SCRUB_LAUNCHERS:
        raise ConfigError(f"scrub.launcher must be one of {', '.join(SCRUB_LAUNCHERS)}")
    positive("recovery.max_attempts", data["recovery"]["max_attempts"], int)
    positive("recovery.max_running", data["recovery"]["max_running"], int)
    backoff = data["recovery"]["backoff_seconds"]
    if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or \
            not math.isfinite(backoff) or not 0 <= backoff <= 3600:
        raise ConfigError("recovery.backoff_seconds must be 0..3600")
    sec = data["security"]
    if bool(sec["server_secret_key"]) != bool(sec["authorized_keys_dir"]):
        raise ConfigError("security needs both server_secret_key and authorized_keys_dir")
    if data["recovery"]["copy_policy"] not in COPY_POLICIES:
        raise ConfigError(f"recovery.copy_policy must be one of {', '.join(COPY_POLICIES)}")
    if not isinstance(data["storage"]["domains"], dict):
        raise ConfigError("storage.domains must be a table of domainID = path")
    _check_storage(data["storage"], positive)
    endpoint = data["metrics"]["endpoint"]
    if not isinstance(endpoint, str):
        raise ConfigError("metrics.endpoint must be \"host:port\" or \"\"")
    if endpoint:
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            raise ConfigError(f"metrics.endpoint: {exc}") from None


def _check_storage(st: dict, positive) -> None:
    if st["lease_manager"] not in LEASE_MANAGERS:
        raise ConfigError(f"storage.lease_manager must be one of {', '.join(LEASE_MANAGERS)}")
    for domain_id, path in st["domains"].items():  # start-up attaches each: no TypeError
        try:
            check_uuid(domain_id, "storage.domains")
        except InvalidParams:
            raise ConfigError(f"storage.domains: {domain_id!r} is not a domain's UUID") from None
        if not isinstance(path, str) or not path or not path.isprintable():
            raise ConfigError(f"storage.domains.{domain_id} must be a path")
    hid = st["host_id_number"]
    if isinstance(hid, bool) or not isinstance(hid, int):
        raise ConfigError("storage.host_id_number must be an integer")
    if st["lease_manager"] == "sanlock" and not 1 <= hid <= 2000:
        raise ConfigError("storage.host_id_number must be 1..2000 with sanlock")
    # sanlock's lease times are multiples of it (a dead host's lease frees after ~8 of them):
    # VDSM uses 10; past 120 a failed host would hold its leases for a quarter of an hour.
    positive("storage.sanlock_io_timeout", st["sanlock_io_timeout"], int, maximum=120)


def check_endpoint(endpoint, *, bind: bool = False) -> str:
    """A ZeroMQ endpoint as this project uses them: tcp://HOST:PORT or ipc://PATH (with
    `bind`, the port may be `*` or 0: any free one). ValueError, saying so, otherwise: a person
    gets one line, never libzmq's EINVAL from deep inside a call."""
    if isinstance(endpoint, str) and len(endpoint) <= 1024 and "\0" not in endpoint:
        scheme, sep, rest = endpoint.partition("://")
        if sep and scheme == "ipc" and rest:
            return endpoint
        if sep and scheme == "tcp":
            host, colon, port = rest.rpartition(":")
            if colon and host and (port.isdigit() and (bind or int(port) > 0)
                                   and int(port) <= 65535 or bind and port == "*"):
                return endpoint
    shown = repr(endpoint)[:200]
    raise ValueError(f"not an endpoint (tcp://HOST:PORT or ipc://PATH): {shown}")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """A metrics endpoint: "127.0.0.1:9478", "[::1]:9478", "localhost:0" (any free port)
    -> (host, port)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535 or not host.strip("[]"):
        raise ValueError(f"not host:port: {endpoint!r}")
    return host.strip("[]"), int(port)


def load(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    data = copy.deepcopy(DEFAULTS)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = _merge(data, tomllib.load(f))
        except (OSError, ValueError) as exc:  # TOMLDecodeError, UnicodeDecodeError are too
            raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        data = _merge(data, overrides)
    _check(data)
    data["host_id"] = data["host_id"] or socket.gethostname()
    run_dir = Path(data["run_dir"] or default_run_dir()).expanduser().absolute()
    data["run_dir"] = str(run_dir)
    for section in ("rpc", "events"):
        data[section]["endpoints"] = [e.replace("{run_dir}", str(run_dir))
                                     for e in data[section]["endpoints"]]
    return Config(data)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write(path: str | os.PathLike, data: dict) -> None:
    """Write `data` as a config file `load` reads back (tomllib reads; nothing in the
    standard library writes): for tests and benchmarks that make agents."""
    out = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]

    def table(prefix: str, mapping: dict) -> None:
        out.append(f"[{prefix}]")
        out.extend(f"{json.dumps(k) if '-' in k else k} = {_toml_value(v)}"
                   for k, v in mapping.items() if not isinstance(v, dict))
        for k, v in mapping.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value)
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
