"""The first commands: serve, call, events, keygen (their output and exit codes are fixed:
tests/e2e/test_cli.py and tests/e2e/test_curve.py hold them to it)."""

from __future__ import annotations

import json
import os
import re
import sys

from agent import config as configmod
from agent.cli import settings


def cmd_keygen(args) -> int:
    from agent.wire.security import keygen

    public, secret = keygen(args.directory, args.name)
    print(json.dumps({"public": public, "secret": secret}))
    return 0


def cmd_serve(args) -> int:
    from agent import logs
    from agent.supervisor.loop import StartupError, Supervisor

    cfg = configmod.load(args.config)
    logs.setup(args.log_level, fmt=args.log_format)  # passed on to workers in the environment
    from agent.wire.security import ConfigError as SecurityError
    from agent.wire.transport import BindError

    try:
        Supervisor(cfg).run()
    except (StartupError, SecurityError, BindError) as exc:
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
    client_cfg = settings.load_client_config()
    endpoint, _ = settings.endpoint(args, "rpc", args.endpoint, client_cfg)
    c, s = settings.keys(args, client_cfg)
    keys = {"client_key": c, "server_key": s} if c else {}
    timeout = args.timeout if args.timeout is not None else \
        client_cfg.get("timeout", settings.DEFAULT_TIMEOUT)
    try:
        settings.check_listening(endpoint)
    except settings.NoAgent as exc:
        print(f"hostagent: {exc}", file=sys.stderr)
        return 3
    with Client(endpoint, timeout=timeout, **keys) as client:
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

    client_cfg = settings.load_client_config()
    endpoint, _ = settings.endpoint(args, "events", args.endpoint, client_cfg, "--endpoint")
    c, s = settings.keys(args, client_cfg)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if c:
        from agent.client.curve import make_client
        make_client(sock, c, s)
    sock.connect(endpoint)
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


def key_flags(p) -> None:
    p.add_argument("--client-key", help="our CURVE key pair (.key_secret); "
                   "default $HOSTAGENT_CLIENT_KEY")
    p.add_argument("--server-key", help="the agent's CURVE public key (.key); "
                   "default $HOSTAGENT_SERVER_KEY")


def add_parsers(sub) -> None:
    p = sub.add_parser("serve", help="run the agent in the foreground")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=None, choices=["auto", "console", "json"],
                   help="readable lines (console) or JSON lines; auto (the default, or "
                        "$HOSTAGENT_LOG_FORMAT): console on a terminal, JSON otherwise "
                        "(journald, files)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("call", help="call one method and print its result as JSON")
    p.add_argument("method")
    p.add_argument("params", nargs="?", help="params as JSON (object or array)")
    p.add_argument("--id", help="the request id, which is the task ID (default: generated)")
    p.add_argument("--endpoint", help="RPC endpoint (default: $HOSTAGENT_ENDPOINT, the agent's)")
    p.add_argument("--timeout", type=settings.timeout_arg, default=None,
                   help="seconds (default: the client config's, else 30)")
    p.add_argument("--json", action="store_true", help="(always JSON)")
    key_flags(p)
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("keygen", help="write a CURVE key pair: NAME.key and NAME.key_secret")
    p.add_argument("directory")
    p.add_argument("--name", default="client")
    p.add_argument("--json", action="store_true", help="(always JSON)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("events", help="print events as JSON lines")
    key_flags(p)
    p.add_argument("topics", nargs="*", help="topic prefixes (default: all)")
    p.add_argument("--endpoint", help="events endpoint (default: $HOSTAGENT_EVENTS, the agent's)")
    p.add_argument("--json", action="store_true", help="(always JSON)")
    p.set_defaults(func=cmd_events)
