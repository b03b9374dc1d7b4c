"""The `hostagent` command: serve, call, events.

Exit codes: 0 success; 1 the agent answered an error (printed on stderr as JSON);
2 bad usage or configuration; 3 no answer in time (is the agent running?).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from agent import config as configmod


def _endpoint(args, section: str) -> str:
    if args.endpoint:
        return args.endpoint
    env = os.environ.get("HOSTAGENT_EVENTS" if section == "events" else "HOSTAGENT_ENDPOINT")
    if env:
        return env
    cfg = configmod.load(args.config)
    from agent.client import endpoints_of

    try:  # what the running agent actually bound, wildcard ports resolved
        return endpoints_of(cfg.run_dir)[section][0]
    except (OSError, ValueError, KeyError, IndexError):
        return cfg[section]["endpoints"][0]


def _keys(args) -> dict:
    """CURVE keys from flags or the environment; both or neither."""
    client = args.client_key or os.environ.get("HOSTAGENT_CLIENT_KEY")
    server = args.server_key or os.environ.get("HOSTAGENT_SERVER_KEY")
    if bool(client) != bool(server):
        raise configmod.ConfigError("CURVE needs both --client-key and --server-key")
    return {"client_key": client, "server_key": server} if client else {}


def cmd_keygen(args) -> int:
    from agent.security import keygen

    public, secret = keygen(args.directory, args.name)
    print(json.dumps({"public": public, "secret": secret}))
    return 0


def cmd_serve(args) -> int:
    from agent import logs
    from agent.supervisor import Agent, StartupError

    cfg = configmod.load(args.config)
    logs.setup(args.log_level)
    from agent.security import ConfigError as SecurityError

    try:
        Agent(cfg).run()
    except (StartupError, SecurityError) as exc:
        print(f"hostagent: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_call(args) -> int:
    from agent.client import CallError, Client, Timeout

    try:
        params = json.loads(args.params) if args.params else None
    except ValueError as exc:
        print(f"hostagent: PARAMS is not JSON: {exc}", file=sys.stderr)
        return 2
    task_id = args.id
    if task_id is not None and re.fullmatch(r"0|-?[1-9][0-9]{0,99}", task_id):
        # Sent as a JSON integer only when that names the same task: "007" stays "007".
        task_id = int(task_id)
    with Client(_endpoint(args, "rpc"), timeout=args.timeout, **_keys(args)) as client:
        try:
            result = client.call(args.method, params, id=task_id)
        except CallError as exc:
            print(json.dumps({"code": exc.code, "message": exc.message, "data": exc.data}),
                  file=sys.stderr)
            return 1
        except Timeout as exc:
            print(f"hostagent: {exc}; is the agent running?", file=sys.stderr)
            return 3
    print(json.dumps(result, indent=2))
    return 0


def cmd_events(args) -> int:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    keys = _keys(args)
    if keys:
        from agent.security import make_client
        make_client(sock, keys["client_key"], keys["server_key"])
    sock.connect(_endpoint(args, "events"))
    for topic in args.topics or [""]:
        sock.setsockopt_string(zmq.SUBSCRIBE, topic)
    try:
        while True:
            _topic, body = sock.recv_multipart()
            sys.stdout.write(body.decode() + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `hostagent events | head`: the reader left, so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        sock.close(0)
        ctx.term()


def _key_flags(p) -> None:
    p.add_argument("--client-key", help="our CURVE key pair (.key_secret); "
                   "default $HOSTAGENT_CLIENT_KEY")
    p.add_argument("--server-key", help="the agent's CURVE public key (.key); "
                   "default $HOSTAGENT_SERVER_KEY")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostagent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="TOML config file (default: the embedded default)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the agent in the foreground")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("call", help="call one method and print its result as JSON")
    p.add_argument("method")
    p.add_argument("params", nargs="?", help="params as JSON (object or array)")
    p.add_argument("--id", help="the request id, which is the task ID (default: generated)")
    p.add_argument("--endpoint", help="RPC endpoint (default: $HOSTAGENT_ENDPOINT, the agent's)")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_call)

    for p in (sub.choices["call"],):
        _key_flags(p)

    p = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key and NAME.key_secret")
    p.add_argument("directory")
    p.add_argument("--name", default="client")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("events", help="print events as JSON lines")
    _key_flags(p)
    p.add_argument("topics", nargs="*", help="topic prefixes (default: all)")
    p.add_argument("--endpoint", help="events endpoint (default: $HOSTAGENT_EVENTS, the agent's)")
    p.set_defaults(func=cmd_events)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except configmod.ConfigError as exc:
        print(f"hostagent: config: {exc}", file=sys.stderr)
        return 2
