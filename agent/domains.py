"""Which storage domains this agent has attached: domainID -> path. No storage I/O here.

Domains in the config's [storage.domains] are attached at every start. Domains attached or
created by RPC are remembered in the run dir (attached.json, replaced atomically), so they
survive an agent restart; a reboot clears the run dir, and the engine attaches again (or the
operator lists the domain in the config).
"""

from __future__ import annotations

import json
import os

from agent import errors, system
from agent.storage.ids import check_uuid


class Domains:
    def __init__(self, config):
        self.file = config.run_dir / "attached.json"
        self.paths: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        for domain_id, path in config["storage"]["domains"].items():
            self.paths[check_uuid(domain_id, "storage.domains")] = os.path.abspath(path)
            self.sources[domain_id] = "config"
        try:
            with open(self.file) as f:
                remembered = json.load(f)
        except (OSError, ValueError):
            remembered = {}
        for domain_id, path in remembered.items():
            self.paths.setdefault(domain_id, path)
            self.sources.setdefault(domain_id, "attach")

    def path(self, domain_id: str) -> str:
        try:
            return self.paths[domain_id]
        except KeyError:
            raise errors.NoSuchDomain(f"domain {domain_id} is not attached",
                                      domainID=domain_id) from None

    def attach(self, domain_id: str, path: str) -> None:
        self.paths[domain_id] = path
        self.sources.setdefault(domain_id, "attach")
        remembered = {d: p for d, p in self.paths.items() if self.sources[d] == "attach"}
        system.write_atomic(self.file, remembered)

    def listing(self) -> list[dict]:
        return [{"domainID": d, "path": p, "attached_by": self.sources[d]}
                for d, p in sorted(self.paths.items())]
