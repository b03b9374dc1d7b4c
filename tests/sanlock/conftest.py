import uuid

import pytest

from tests.sanlock.daemons import Daemon
from tests.support.harness import cleanup_dir, short_tmpdir


@pytest.fixture
def daemons():
    """daemons(name) -> a running sanlock daemon of its own; all stopped (by pid) after."""
    base = short_tmpdir("sl-")
    made: list[Daemon] = []

    def start(name: str) -> Daemon:
        d = Daemon(base / name).start()
        made.append(d)
        return d
    yield start
    for d in made:
        d.stop()
    cleanup_dir(base)


@pytest.fixture
def shared(workdir):
    """A domain the hosts of a test share: (domainID, path)."""
    return str(uuid.uuid4()), str(workdir / "shared")
