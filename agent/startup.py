"""Start-up work derived from what the agent finds, before it reports ready.

Until every job registered in `agent.startup_jobs` has ended, requests are answered
99 RecoveryInProgress.
"""

from __future__ import annotations


def begin(agent) -> None:
    """Register the start-up jobs (none without storage)."""
