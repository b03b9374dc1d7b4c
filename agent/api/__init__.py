"""The RPC namespaces: one module per namespace, each registering its verbs
(agent/wire/verbs.py) with their params, docs and handlers; and the generator of
docs/api.md (apidoc.py) with its examples (examples.py)."""

from __future__ import annotations

from agent.api import bitmap, debug, export, host, image, storage_domain, task, volume
from agent.wire.verbs import REGISTRY, Verb

NAMESPACES = (host, task, debug, storage_domain, volume, image, export, bitmap)


def load_all() -> dict[str, Verb]:
    """Every verb, by name (each namespace registered its own when it was imported)."""
    return REGISTRY
