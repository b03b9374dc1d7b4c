"""`hostagent top` in a real terminal (tmux): live from events, true from polling, Ctrl-C quits."""

from __future__ import annotations

import re

from tests.e2e.test_cli import HOSTAGENT
from tests.support.harness import pane_exit_code, task_state, wait_for
from tests.support.storage_flow import MiB, dst_for, make_source, new_id, status


def run_top(tmux, agent, *flags: str) -> int:
    return tmux.start(f"{HOSTAGENT} top --config {agent.config_path} {' '.join(flags)}")


def quit_top(tmux, pid: int) -> str:
    tmux("send-keys", "-t", "t", "C-c")
    code = wait_for(lambda: (c := pane_exit_code(tmux, pid)) is not None and [c], 20,
                    what="top to exit on Ctrl-C")[0]
    screen = tmux.screen()
    assert code == 0, (code, screen)
    assert "Traceback" not in screen
    return screen


def test_top_follows_a_copy_live_and_quits_on_ctrl_c(make_agent, workdir, tmux):
    agent = make_agent(copy={"max_bytes_per_second": 16 * MiB, "checkpoint_seconds": 0.2})
    domain_id = new_id()
    agent.call("StorageDomain.create", {"domainID": domain_id, "path": str(workdir / "d")})
    src = make_source(agent, domain_id, 96 * MiB)
    pid = run_top(tmux, agent)
    wait_for(lambda: "no active task" in tmux.screen(), 30, what="top's first screen")
    assert "ready since" in tmux.screen()

    dst = dst_for(domain_id)
    agent.client().call("Image.copy", {"src": src, "dst": dst}, id="top-copy")
    seen = []

    def moving():
        screen = tmux.screen()
        row = next((line for line in screen.splitlines()
                    if line.startswith("top-copy") and "MiB/s" in line), None)
        if row and (m := re.search(r"(\d+\.\d)%", row)):
            seen.append(float(m.group(1)))
        return len({p for p in seen if 0 < p < 100}) >= 2  # two different frames mid-copy
    try:
        wait_for(moving, 30, interval=0.1, what="the copy's row moving on top's screen")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; percents seen {seen}; screen:\n{tmux.screen()}") from None
    screen = tmux.screen()
    assert "copies" in screen and dst["volumeID"][:13] in screen and "Image.copy" in screen
    assert "━" in screen  # the bar

    wait_for(lambda: status(agent, dst)["legality"] == "LEGAL", 60, what="the copy done")
    wait_for(lambda: re.search(r"top-copy\s+Image\.copy\s+done", tmux.screen()), 10,
             what="the copy among the lately ended")
    assert "no active task" in tmux.screen()
    quit_top(tmux, pid)


def test_without_events_top_falls_back_to_polling(make_agent, tmux):
    agent = make_agent()
    # An events endpoint nobody serves: no event ever arrives, polls keep the view true.
    pid = run_top(tmux, agent, "--events-endpoint", f"ipc://{agent.run_dir}/nobody.sock")
    agent.client().send("Debug.sleep", {"seconds": 60}, id="poll-me")
    wait_for(lambda: task_state(agent, "poll-me") == "running", what="the sleeper running")
    wait_for(lambda: re.search(r"poll-me\s+Debug\.sleep\s+running", tmux.screen()), 15,
             what="the task on the screen, from polling")
    assert "(polling)" in tmux.screen()
    agent.call("Task.abort", {"taskID": "poll-me"})
    wait_for(lambda: "no active task" in tmux.screen(), 15, what="the abort seen by a poll")
    quit_top(tmux, pid)
