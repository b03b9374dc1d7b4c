"""systemd/hostagent.service: valid for systemd, and crash-only by construction."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "hostagent.service"
UNIT_NAME = UNIT.name


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(exe).is_file():
        pytest.fail(
            "systemd-analyze not found: install Debian's `systemd` package "
            "(apt-get install systemd); CI installs it, so this must not be skipped"
        )
    return exe


def _testable_copy(tmp_path: Path, unit_text: str) -> Path:
    # verify insists that ExecStart's binary exists and is executable, and
    # /usr/local/bin/hostagent is not installed here. Point it at the running
    # interpreter, keeping the arguments, and leave every other line as is.
    exec_line = f"ExecStart={sys.executable} -m agent serve --config /etc/hostagent/hostagent.toml"
    text, count = re.subn(r"(?m)^ExecStart=.*$", lambda _: exec_line, unit_text)
    assert count == 1, "expected exactly one ExecStart= line"
    copy = tmp_path / UNIT_NAME
    copy.write_text(text)
    return copy


def _verify(unit: Path) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [_systemd_analyze(), "verify", str(unit)],
        capture_output=True, text=True, timeout=60, cwd=unit.parent,
    )
    # verify also reports on unrelated units installed on the machine; only
    # lines naming our unit are ours. Unknown keys and unparsable values are
    # reported here while the exit code stays 0.
    ours = [line for line in proc.stderr.splitlines() if unit.name in line]
    return proc.returncode, ours, proc.stderr


def _unit(text: str | None = None) -> configparser.RawConfigParser:
    # strict=False: systemd allows repeated keys (the last one wins or they
    # accumulate), which configparser would otherwise reject.
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(text if text is not None else UNIT.read_text())
    return parser


def test_systemd_analyze_verify_accepts_unit(tmp_path):
    copy = _testable_copy(tmp_path, UNIT.read_text())
    rc, ours, stderr = _verify(copy)
    assert rc == 0, f"systemd-analyze verify exited {rc}:\n{stderr}"
    assert not ours, "systemd-analyze verify complained about the unit:\n" + stderr


def test_verify_check_is_not_vacuous(tmp_path):
    # If the stderr filter ever stopped matching, the test above would pass
    # on anything. A known-bad key must be caught by the same check.
    bad = UNIT.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n", 1)
    rc, ours, stderr = _verify(_testable_copy(tmp_path, bad))
    assert any("NoSuchKey" in line for line in ours), stderr


def test_unit_is_crash_only():
    unit = _unit()
    service = unit["Service"]
    assert service.get("Type") == "notify"
    assert service.get("NotifyAccess") == "main"
    assert service.get("Restart") == "always"
    # Workers must die with the agent, or a recovered agent and a leftover
    # worker would both own the same operation.
    assert service.get("KillMode") == "control-group"
    # Stopping is a kill; there is no shutdown path to maintain.
    for key in ("ExecStop", "ExecStopPost", "ExecReload"):
        assert key not in service, f"{key}= contradicts crash-only stop"
    assert service.get("ExecStart", "").startswith("/usr/local/bin/hostagent serve ")
    assert service.get("WatchdogSec") == "10"
    assert service.get("RuntimeDirectory") == "hostagent"
    assert service.get("RuntimeDirectoryPreserve") == "yes"
    assert service.get("StateDirectory") == "hostagent"
    assert unit["Install"].get("WantedBy") == "multi-user.target"


def test_unit_does_not_namespace_the_file_system():
    # Any of these hides storage paths or stops the agent's mounts from
    # propagating to the host (systemd.exec(5), MountFlags=).
    service = _unit()["Service"]
    forbidden = {
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
        "PrivateMounts", "ReadOnlyPaths", "InaccessiblePaths", "ReadWritePaths",
        "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "MountFlags",
        "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "ProtectProc", "ProtectClock", "DevicePolicy",
        "RootDirectory", "RootImage",
    }
    present = sorted(forbidden & set(service))
    assert not present, f"file system namespacing breaks a storage agent: {present}"


def test_the_sanlock_drop_in_orders_the_agent_after_sanlock_without_binding_them(tmp_path):
    drop_in = REPO / "systemd" / "hostagent.service.d" / "sanlock.conf"
    unit = _unit(drop_in.read_text())
    assert set(unit["Unit"]["After"].split()) >= {"sanlock.service", "wdmd.service"}
    assert set(unit["Unit"]["Wants"].split()) >= {"sanlock.service"}
    for binding in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert binding not in unit["Unit"], binding  # a restart of one must not touch the other
    # And systemd accepts the unit with the drop-in applied.
    copy = _testable_copy(tmp_path, UNIT.read_text())
    (tmp_path / "hostagent.service.d").mkdir()
    (tmp_path / "hostagent.service.d" / "sanlock.conf").write_text(drop_in.read_text())
    rc, ours, stderr = _verify(copy)
    assert rc == 0 and not ours, stderr
