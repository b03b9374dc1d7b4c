"""The operations a worker can run, by name. Only names listed here can ever run."""

from __future__ import annotations

import importlib

OPS = {
    "debug.sleep": "workers.ops.debug:sleep",
}


def get(name: str):
    module, func = OPS[name].split(":")
    return getattr(importlib.import_module(module), func)


def preload() -> None:
    """Import every operation's module (the fork server does this once)."""
    for name in OPS:
        get(name)
