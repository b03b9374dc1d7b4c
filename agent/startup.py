"""Start-up work derived from what the agent finds, before it reports ready.

Every attached domain (from the config, or attached by RPC in an earlier life) is scanned
for copy markers, and the recovery policy is applied to each (agent/recovery.py). Until
every scan has ended, requests are answered 99 RecoveryInProgress.
"""

from __future__ import annotations

from agent import recovery


def begin(agent) -> None:
    recovery.install(agent)
    for domain_id in list(agent.domains.paths):
        recovery.scan(agent, domain_id, startup=True)
