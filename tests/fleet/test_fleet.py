"""The fleet suite: `pytest tests/fleet [--fleet-hosts N --fleet-rounds R --fleet-seed S]`.

The default (4 hosts, 3 rounds: an agent killed, a worker killed, a whole host killed) runs
in CI; docs/reliability.md records a long run (--fleet-summary FILE writes its figures).
"""

import json

from tests.fleet.fleet import KILLS, Fleet
from tests.sanlock.daemons import needs_sanlock

pytestmark = needs_sanlock


def test_fleet(make_agent, workdir, request):
    hosts = request.config.getoption("--fleet-hosts")
    rounds = request.config.getoption("--fleet-rounds")
    seed = request.config.getoption("--fleet-seed")
    fleet = Fleet(make_agent, workdir, hosts, seed)
    try:
        for i in range(rounds):
            kind = KILLS[i] if i < len(KILLS) else None  # each kind once, then at random
            try:
                fleet.round(kill=kind)
            except AssertionError as exc:
                raise AssertionError(f"breach in round {fleet.round_no} (replay: "
                                     f"--fleet-seed={seed} --fleet-rounds={fleet.round_no}): "
                                     f"{exc}") from exc
    finally:
        fleet.close()
        summary = fleet.summary()
        print("fleet summary:", json.dumps(summary))
        out = request.config.getoption("--fleet-summary")
        if out:
            with open(out, "w") as f:
                json.dump(summary, f, indent=1)
    assert fleet.round_no == rounds and summary["breaches"] == 0
