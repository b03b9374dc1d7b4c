"""The seeded chaos run: `pytest -m chaos --chaos-seed=S --chaos-iterations=N`.

CI runs the short default; docs/reliability.md records a long run.
"""

import json
import os

import pytest

from tests.chaos.runner import Chaos

pytestmark = pytest.mark.chaos


def test_chaos(make_agent, workdir, request):
    seed = request.config.getoption("--chaos-seed")
    rounds = request.config.getoption("--chaos-iterations")
    chaos = Chaos(make_agent, workdir, seed)
    try:
        for _ in range(rounds):
            try:
                chaos.round()
            except AssertionError as exc:
                raise AssertionError(
                    f"breach in round {chaos.round_no} (replay: --chaos-seed={seed} "
                    f"--chaos-iterations={chaos.round_no}): {exc}") from exc
    finally:
        chaos.close()
        summary = {"seed": seed, "rounds": chaos.round_no, "kills": chaos.kills,
                   "faults": dict(chaos.counts), "sampler_samples": chaos.sampler.samples,
                   "ping_seconds_max": max(chaos.ping_seconds, default=None),
                   "ping_seconds": sorted(chaos.ping_seconds)}
        print("chaos summary:", json.dumps(summary))
        out = os.environ.get("HOSTAGENT_CHAOS_SUMMARY")
        if out:
            with open(out, "w") as f:
                json.dump(summary, f, indent=1)
    assert chaos.round_no == rounds
