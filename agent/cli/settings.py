"""Where the command line finds its agent, its keys and its output style.

Each setting is taken from the first of: a flag; the environment; the agent config named by
`--config` (endpoints only: what that agent bound, from its run dir); the client config file;
the agent's embedded default (what the local default agent bound, else its default
endpoints).

    flag                environment              client config key
    --endpoint          HOSTAGENT_ENDPOINT       endpoint
    --events-endpoint   HOSTAGENT_EVENTS         events_endpoint
    --client-key        HOSTAGENT_CLIENT_KEY     client_key
    --server-key        HOSTAGENT_SERVER_KEY     server_key
    --json              HOSTAGENT_OUTPUT=json    output = "json" | "human"
    --timeout                                    timeout (seconds)

The client config file is TOML: $HOSTAGENT_CLIENT_CONFIG, else
$XDG_CONFIG_HOME/hostagent/client.toml (~/.config/hostagent/client.toml). An events endpoint
that nothing names is guessed from an RPC endpoint given by flag, environment or client config
(the next port, or events.sock beside rpc.sock).
"""

from __future__ import annotations

import argparse
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from agent import config as configmod
from agent.cli import output
from agent.client.protocol import endpoints_of, guess_events_endpoint

CLIENT_KEYS = {"endpoint": str, "events_endpoint": str, "client_key": str, "server_key": str,
               "output": str, "timeout": (int, float)}
DEFAULT_TIMEOUT = 30.0


def client_config_path() -> Path:
    explicit = os.environ.get("HOSTAGENT_CLIENT_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "hostagent" / "client.toml"


def load_client_config() -> dict:
    path = client_config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if os.environ.get("HOSTAGENT_CLIENT_CONFIG"):
            raise configmod.ConfigError(f"client config {path}: no such file") from None
        return {}
    except (OSError, ValueError) as exc:  # TOMLDecodeError, UnicodeDecodeError are too
        raise configmod.ConfigError(f"client config {path}: {exc}") from None
    for key, value in data.items():
        if key not in CLIENT_KEYS:
            raise configmod.ConfigError(f"client config {path}: unknown key {key!r}")
        kind = CLIENT_KEYS[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise configmod.ConfigError(f"client config {path}: {key} has the wrong type")
    if "timeout" in data:
        try:
            seconds(data["timeout"])
        except ValueError as exc:
            raise configmod.ConfigError(f"client config {path}: timeout: {exc}") from None
    for key in ("endpoint", "events_endpoint"):
        if key in data:
            try:
                configmod.check_endpoint(data[key])
            except ValueError as exc:
                raise configmod.ConfigError(f"client config {path}: {key}: {exc}") from None
    if data.get("output", "human") not in ("human", "json"):
        raise configmod.ConfigError(f"client config {path}: output must be human or json")
    return data


@dataclass
class Settings:
    endpoint: str
    events_endpoint: str
    client_key: str | None
    server_key: str | None
    json: bool
    timeout: float

    @property
    def keys(self) -> dict:
        return {"client_key": self.client_key, "server_key": self.server_key} \
            if self.client_key else {}


def _agent_endpoint(config_path, section: str) -> str:
    cfg = configmod.load(config_path)
    try:  # what the running agent actually bound, wildcard ports resolved
        return endpoints_of(cfg.run_dir)[section][0]
    except (OSError, ValueError, KeyError, IndexError):
        return cfg[section]["endpoints"][0]


MAX_TIMEOUT = 7 * 86400.0  # a week: anything longer is a wait without end


def seconds(value) -> float:
    """A timeout: a finite number of seconds, more than 0, at most a week (argparse's type
    for --timeout, and the client config's check)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a number of seconds: {str(value)[:50]!r}") from None
    if isinstance(value, bool) or not math.isfinite(out) or not 0 < out <= MAX_TIMEOUT:
        raise ValueError(f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds")
    return out


def timeout_arg(text: str) -> float:
    try:
        return seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked(value: str, where: str) -> str:
    try:
        return configmod.check_endpoint(value)
    except ValueError as exc:
        raise output.UsageError(f"{where}: {exc}") from None


def endpoint(args, section: str, flag: str | None, client: dict,
             flag_name: str | None = None) -> tuple[str, bool]:
    """(endpoint, whether it was named rather than taken from an agent config); UsageError
    if what was named is not an endpoint."""
    env_name = "HOSTAGENT_EVENTS" if section == "events" else "HOSTAGENT_ENDPOINT"
    if flag:
        name = flag_name or ("--events-endpoint" if section == "events" else "--endpoint")
        return _checked(flag, name), True
    env = os.environ.get(env_name)
    if env:
        return _checked(env, f"${env_name}"), True
    if getattr(args, "config", None):
        return _agent_endpoint(args.config, section), False
    key = "events_endpoint" if section == "events" else "endpoint"
    if client.get(key):
        return client[key], True
    return _agent_endpoint(None, section), False


def keys(args, client: dict) -> tuple[str | None, str | None]:
    """CURVE keys; both or neither."""
    c = getattr(args, "client_key", None) or os.environ.get("HOSTAGENT_CLIENT_KEY") \
        or client.get("client_key")
    s = getattr(args, "server_key", None) or os.environ.get("HOSTAGENT_SERVER_KEY") \
        or client.get("server_key")
    if bool(c) != bool(s):
        raise configmod.ConfigError("CURVE needs both --client-key and --server-key")
    return c or None, s or None


def resolve(args) -> Settings:
    client = load_client_config()
    rpc, named = endpoint(args, "rpc", getattr(args, "endpoint", None), client)
    events, events_named = endpoint(args, "events", getattr(args, "events_endpoint", None),
                                    client)
    if named and not events_named:
        events = guess_events_endpoint(rpc)  # the agent named, not the local default's
    c, s = keys(args, client)
    output = os.environ.get("HOSTAGENT_OUTPUT") or client.get("output", "human")
    timeout = getattr(args, "timeout", None)
    return Settings(rpc, events, c, s,
                    json=bool(getattr(args, "json", False)) or output == "json",
                    timeout=float(timeout if timeout is not None
                                  else client.get("timeout", DEFAULT_TIMEOUT)))


class NoAgent(Exception):
    """Nothing listens where the command would call: said at once, not after its timeout."""


def check_listening(endpoint: str) -> None:
    """NoAgent when the OS says at once that nothing listens at `endpoint` (no socket file,
    a connection refused) or that this user may not connect; otherwise nothing, and ZeroMQ
    waits as it always does (something listens, or the OS cannot tell: a dropped packet, a
    name it cannot resolve). The probe is a plain connect, closed before any byte: a
    listening agent sees a peer come and go."""
    import socket

    scheme, _, rest = endpoint.partition("://")
    try:
        if scheme == "ipc":
            path = "\0" + rest[1:] if rest.startswith("@") else rest  # abstract: ZeroMQ's @
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(path)
        elif scheme == "tcp":
            host, _, port = rest.rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NoAgent(f"nothing listens at {endpoint} ({exc.strerror}); is the agent "
                      "running?") from None
    except PermissionError as exc:  # ZeroMQ would retry it in silence for the whole timeout
        raise NoAgent(f"cannot connect to {endpoint} ({exc.strerror}): the agent's ipc "
                      "sockets are its own user's (mode 0600)") from None
    except (OSError, ValueError):
        return
