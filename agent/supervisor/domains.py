"""Which storage domains this agent has attached: domainID -> path. No storage I/O here.

Domains in the config's [storage.domains] are attached at every start. Domains attached or
created by RPC are remembered in the run dir (attached.json, replaced atomically), so they
survive an agent restart; a reboot clears the run dir, and the engine attaches again (or the
operator lists the domain in the config).

The file is the agent's own, but it lives on a disk and anyone can edit it: start-up keeps
every entry that is a domain UUID mapped to an absolute path, logs each one it ignores and
why, and never exits over it. A file that is not a JSON object at all (truncated, empty,
garbage) is renamed aside to attached.json.damaged (for an operator to read) and logged as
an error, so the next attachment does not overwrite the only record of what was lost.
"""

from __future__ import annotations

import json
import os

from agent import errors, logs, system
from agent.ids import check_uuid

log = logs.get(component="domains")


class Domains:
    def __init__(self, config):
        self.file = config.run_dir / "attached.json"
        self.paths: dict[str, str] = {}
        self.sources: dict[str, str] = {}
        self.pending: dict[str, str] = {}  # domainID -> path of a create or attach in flight
        for domain_id, path in config["storage"]["domains"].items():
            self.paths[check_uuid(domain_id, "storage.domains")] = os.path.abspath(path)
            self.sources[domain_id] = "config"
        for domain_id, path in self._remembered().items():
            self.paths.setdefault(domain_id, path)
            self.sources.setdefault(domain_id, "attach")

    def _remembered(self) -> dict[str, str]:
        try:
            with open(self.file, "rb") as f:
                data = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            return self._damaged(f"unreadable: {str(exc)[:200]}")
        if not isinstance(data, dict):
            return self._damaged(f"a JSON {type(data).__name__}, not an object")
        good = {}
        for domain_id, path in data.items():
            try:
                domain_id = check_uuid(domain_id, "domainID")
            except errors.AgentError:
                log.warning("attached_entry_ignored", file=str(self.file),
                            domain_id=str(domain_id)[:100], why="not a domain UUID")
                continue
            if not isinstance(path, str) or not path.startswith("/") or "\x00" in path:
                log.warning("attached_entry_ignored", file=str(self.file), domain_id=domain_id,
                            why="its path is not an absolute path")
                continue
            good[domain_id] = os.path.normpath(path)
        return good

    def _damaged(self, why: str) -> dict:
        aside = self.file.with_name(self.file.name + ".damaged")
        try:
            os.replace(self.file, aside)
        except OSError:
            aside = None
        log.error("attached_file_damaged", file=str(self.file), why=why,
                  kept_as=str(aside) if aside else None,
                  consequence="domains attached by RPC before this start are not attached; "
                              "attach them again")
        return {}

    def path(self, domain_id: str) -> str:
        try:
            return self.paths[domain_id]
        except KeyError:
            raise errors.NoSuchDomain(f"domain {domain_id} is not attached",
                                      domainID=domain_id) from None

    def reserve(self, domain_id: str, path: str) -> None:
        """Claim `domain_id` and `path` for one create or attach until release(): of two at
        once (one UUID at two paths, two UUIDs at one path), the second is refused here, so
        a client is never told "created" of a domain that another request orphaned."""
        if domain_id in self.paths:
            raise errors.DomainExists(f"domain {domain_id} is already attached",
                                      domainID=domain_id, path=self.paths[domain_id])
        if domain_id in self.pending:
            raise errors.DomainExists(f"domain {domain_id} is being created or attached",
                                      domainID=domain_id, path=self.pending[domain_id])
        for other, where in (*self.paths.items(), *self.pending.items()):
            if where == path:
                raise errors.DomainExists("this directory is attached (or being attached) as "
                                          f"domain {other}", domainID=other, path=path)
        self.pending[domain_id] = path

    def release(self, domain_id: str) -> None:
        self.pending.pop(domain_id, None)

    def attach(self, domain_id: str, path: str) -> None:
        """Remember the attachment on disk first, then here: a client is told "attached"
        only once a restart would know it too."""
        remembered = {d: p for d, p in self.paths.items() if self.sources[d] == "attach"}
        remembered[domain_id] = path
        try:
            system.write_atomic(self.file, remembered)
        except OSError as exc:
            raise errors.OperationFailed(f"cannot record the attachment in {self.file}: "
                                         f"{exc.strerror}") from None
        self.paths[domain_id] = path
        self.sources.setdefault(domain_id, "attach")

    def listing(self) -> list[dict]:
        return [{"domainID": d, "path": p, "attached_by": self.sources[d]}
                for d, p in sorted(self.paths.items())]
