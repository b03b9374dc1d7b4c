import os
import re
import shutil
import signal

import pytest


def pytest_configure(config):
    # pytest-xdist's workers inherit COLUMNS=80 and LINES=24 from execnet, so a `hostagent`
    # a test runs would lay its tables out for 80 columns there and for its own default
    # elsewhere. Tests that want a terminal's size say so (tests/e2e/test_cli_terminal.py).
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    # Started from a shell without job control as a background job (`bash .ci/run &`), the
    # suite inherits SIGINT ignored, and so would every `hostagent` it starts: an ignored
    # signal stays ignored across exec, and a test's Ctrl-C (SIGINT) would then be lost. A
    # handler of ours is reset to the default in each child instead.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    group = parser.getgroup("chaos", "the seeded chaos suite (tests/chaos)")
    group.addoption("--chaos-seed", type=int, default=20261123,
                    help="seed of the chaos run (printed on a breach, to replay it)")
    group.addoption("--chaos-iterations", type=int, default=6,
                    help="rounds of the chaos run (CI's default is short)")
    parser.addoption("--fuzz-examples", type=int, default=300,
                     help="inputs the bad-input fuzz test sends (CI's default is short)")
    group = parser.getgroup("fleet", "the fleet suite (tests/fleet): hosts sharing storage")
    group.addoption("--fleet-hosts", type=int, default=4, help="simulated hosts")
    group.addoption("--fleet-rounds", type=int, default=3,
                    help="rounds (the first three kill an agent, a worker, a whole host)")
    group.addoption("--fleet-seed", type=int, default=20261201, help="seed of the run")
    group.addoption("--fleet-summary", default=None, help="write the run's figures here")
    parser.addoption("--hostile-scale", type=int, default=1,
                     help="how hard tests/hostile pushes (rounds, peers, messages); "
                          "CI's default is 1, docs/reliability.md has a long run's")


def pytest_collection_modifyitems(config, items):
    """A long chaos or fuzz run gets a timeout that grows with its size (the default 120 s
    is for CI's short ones): ~3 s a round and ~15 ms an input were measured, given 10x."""
    budget = {"test_chaos": 30 * config.getoption("--chaos-iterations"),
              "test_fleet": 60 + 200 * config.getoption("--fleet-rounds"),
              "test_generated_messages": 0.15 * config.getoption("--fuzz-examples")}
    for item in items:
        seconds = budget.get(item.originalname)
        if seconds and seconds > 120 and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(seconds))


from tests.support.harness import AgentProcess, Tmux, cleanup_dir, short_tmpdir  # noqa: E402
from tests.support.storage_flow import new_id  # noqa: E402


@pytest.fixture
def workdir():
    path = short_tmpdir()
    yield path
    cleanup_dir(path)


QUERIES = re.compile(r'"method": "\w+\.get')  # a test's polling, which would fill the tail


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed shows the tail of each agent's log it made: a CI run's output is
    all there is to read afterwards."""
    report = yield
    make = getattr(item, "funcargs", {}).get("make_agent")
    if report.failed and report.when == "call" and make is not None:
        for a in make.made:
            report.sections.append((f"agent {a.name}'s log (tail, queries left out)",
                                    a.log(leave_out=QUERIES)))
    return report


@pytest.fixture
def make_agent(workdir):
    """make_agent(name="a", start=True, **config overrides) -> a running AgentProcess."""
    made: list[AgentProcess] = []

    def make(name: str = "a", start: bool = True, **overrides) -> AgentProcess:
        assert name not in {a.name for a in made}, f"an agent {name!r} exists: reuse it"
        agent = AgentProcess(workdir, name, **overrides)
        made.append(agent)
        if start:
            agent.start()
        return agent

    make.made = made  # for pytest_runtest_makereport
    yield make
    leftovers, failures = [], []
    for a in made:  # every agent closed, even when closing one of them fails
        try:
            leftovers += [(a.name, pid) for pid in a.close()]
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]
    assert not leftovers, f"workers outlived their agent: {leftovers}"


@pytest.fixture
def agent(make_agent):
    return make_agent()


@pytest.fixture
def domain_agent(make_agent, workdir):
    """An agent with one domain of its own made: agent.domain_id, agent.root (its path)."""
    agent = make_agent()
    agent.domain_id, agent.root = new_id(), workdir / "dom"
    agent.call("StorageDomain.create", {"domainID": agent.domain_id, "path": str(agent.root)})
    return agent


@pytest.fixture
def tmux():
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed")
    t = Tmux()
    yield t
    t.kill()
