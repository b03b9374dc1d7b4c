"""The `hostagent` command: run the agent, and drive it.

serve, call, events and keygen are the plain tools; copy, continue, wait, upload, download,
tasks, status, watch, top, volume and domain are for people (tables, progress bars) and,
with --json, scripts.
"""

from __future__ import annotations

import argparse
import os
import sys

from agent import __version__
from agent import config as configmod
from agent.cli import backup, basic, copying, output, settings, storage, transfers, views
from agent.cli import top as top_view


class Context:
    """What a command for people gets: a client, a console, and whether to print JSON."""

    def __init__(self, args):
        self.settings = settings.resolve(args)
        self.json = self.settings.json
        self._out = self._client = self._calls = None

    @property
    def out(self):
        if self._out is None:
            self._out = output.console()
        return self._out

    @property
    def client(self):
        """The whole client (BlockingClient): waits, subscriptions, copies."""
        if self._client is None:
            from agent.client import BlockingClient
            s = self.settings
            settings.check_listening(s.endpoint)
            self._client = BlockingClient(s.endpoint, s.events_endpoint, timeout=s.timeout,
                                          **s.keys)
        return self._client

    @property
    def calls(self):
        """For a command that only calls: a plain DEALER (agent/client/dealer.py), no event
        loop to import and start."""
        if self._calls is None:
            from agent.client import Client
            s = self.settings
            settings.check_listening(s.endpoint)
            self._calls = Client(s.endpoint, timeout=s.timeout, **s.keys)
        return self._calls

    def bar(self, label: str, in_bytes: bool):
        """A progress bar (agent/cli/bar.py) at `out`, for people; None with --json."""
        if self.json:
            return None
        from agent.cli.bar import Bar
        return Bar(self.out, label, in_bytes)

    def close(self) -> None:
        for client in (self._client, self._calls):
            if client is not None:
                client.close()


def run_for_people(args) -> int:
    """Run a command with a Context; every failure becomes a readable line and an exit code."""
    from agent.client import CallError, Timeout
    from agent.client.curve import KeyFileError

    ctx = None
    try:
        ctx = Context(args)
        return args.func(ctx, args)
    except CallError as exc:
        return output.call_error(exc, ctx.json if ctx else False)
    except Timeout as exc:
        output.error(f"{exc}; is the agent running (at {ctx.settings.endpoint})?")
        return output.NO_ANSWER
    except settings.NoAgent as exc:
        output.error(str(exc))
        return output.NO_ANSWER
    except (output.UsageError, KeyFileError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):  # `hostagent watch | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return output.OK
        output.error(str(exc))
        return output.USAGE
    except KeyboardInterrupt:
        return output.OK if args.command in ("watch", "top") else output.DETACHED
    finally:
        if ctx is not None:
            try:
                ctx.close()
            except BaseException:
                pass


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="hostagent", description=__doc__.split("\n\n")[0],
        epilog=output.EXIT_CODES + "\n\n" + settings.__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    config_help = ("the agent's TOML config file (default: the embedded default); clients "
                   "take its endpoints")
    top.add_argument("--config", help=config_help)
    top.add_argument("--version", action="version", version=f"hostagent {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    basic.add_parsers(sub)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    common.add_argument("--endpoint", help="RPC endpoint (default: $HOSTAGENT_ENDPOINT, the "
                                           "client config's, the agent's)")
    common.add_argument("--events-endpoint", help="events endpoint (default: "
                                                  "$HOSTAGENT_EVENTS, the client config's, the "
                                                  "agent's)")
    common.add_argument("--timeout", type=settings.timeout_arg, default=None,
                        help="seconds to wait for each answer (default 30)")
    basic.key_flags(common)
    copying.add_parsers(sub, common)
    transfers.add_parsers(sub, common)
    backup.add_parsers(sub, common)
    views.add_parsers(sub, common)
    top_view.add_parsers(sub, common)
    storage.add_parsers(sub, common)
    # Global options are taken after the command too (`hostagent serve --config F`, as the
    # systemd unit and people type it); SUPPRESS keeps one given before from being reset.
    for command in set(sub.choices.values()):
        command.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.func in (basic.cmd_serve, basic.cmd_call, basic.cmd_events, basic.cmd_keygen):
            return args.func(args)
        return run_for_people(args)
    except configmod.ConfigError as exc:
        print(f"hostagent: config: {exc}", file=sys.stderr)
        return output.USAGE
    except output.UsageError as exc:
        print(f"hostagent: {exc}", file=sys.stderr)
        return output.USAGE
    except Exception as exc:  # a person gets one line, never a traceback
        if args.func is basic.cmd_serve:
            raise  # the agent's own: its traceback belongs in its log
        import zmq
        if isinstance(exc, zmq.ZMQError):  # an endpoint or key libzmq would not take
            print(f"hostagent: {exc}", file=sys.stderr)
            return output.USAGE
        print(f"hostagent: unexpected {type(exc).__name__}: {exc} (a bug: please report "
              f"it)", file=sys.stderr)
        return 1
