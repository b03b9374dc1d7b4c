"""Configuration: defaults, the run dir, what is refused (agent/config.py)."""

import socket
from pathlib import Path

import pytest

from agent import config as configmod


@pytest.fixture
def no_xdg(monkeypatch, tmp_path):
    for var in ("XDG_RUNTIME_DIR", "XDG_STATE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_defaults_load(no_xdg):
    cfg = configmod.load()
    assert cfg.host_id == socket.gethostname() and cfg["debug"] is False
    assert cfg.run_dir == no_xdg / "home/.local/state/hostagent/run"
    assert cfg["rpc"]["endpoints"] == ["tcp://127.0.0.1:5670", f"ipc://{cfg.run_dir}/rpc.sock"]
    assert cfg["events"]["endpoints"] == ["tcp://127.0.0.1:5671",
                                          f"ipc://{cfg.run_dir}/events.sock"]
    assert cfg["recovery"]["copy_policy"] == "resume"
    assert configmod.DEFAULTS["rpc"]["endpoints"][1] == "ipc://{run_dir}/rpc.sock"  # untouched


def test_xdg_runtime_dir_is_the_default_run_dir(no_xdg, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(no_xdg / "xdg"))
    cfg = configmod.load()
    assert cfg.run_dir == no_xdg / "xdg/hostagent"
    assert cfg["rpc"]["endpoints"][1] == f"ipc://{no_xdg}/xdg/hostagent/rpc.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(no_xdg / "state"))
    assert configmod.load().run_dir == no_xdg / "state/hostagent/run"


def test_run_dir_expansion_in_endpoints(tmp_path, monkeypatch):
    cfg_file = tmp_path / "a.toml"
    cfg_file.write_text('run_dir = "/srv/ha"\nhost_id = "h1"\n'
                        '[events]\nendpoints = ["ipc://{run_dir}/ev.sock", "tcp://*:0"]\n')
    cfg = configmod.load(cfg_file)
    assert cfg.host_id == "h1" and cfg.run_dir == Path("/srv/ha")
    assert cfg["events"]["endpoints"] == ["ipc:///srv/ha/ev.sock", "tcp://*:0"]
    assert cfg["rpc"]["endpoints"][1] == "ipc:///srv/ha/rpc.sock"
    monkeypatch.chdir(tmp_path)
    assert configmod.load(overrides={"run_dir": "rel"}).run_dir == tmp_path / "rel"


@pytest.mark.parametrize("overrides, words", [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"rpc": {"endpoint": []}}, "unknown key 'rpc.endpoint'"),
    ({"rpc": 5}, "'rpc' must be a table"),
    ({"recovery": {"copy_policy": "yolo"}}, "recovery.copy_policy must be one of"),
    ({"tasks": {"retain_max": 0}}, "tasks.retain_max must be a positive number"),
    ({"workers": {"deadline_seconds": True}}, "workers.deadline_seconds"),
    ({"rpc": {"endpoints": "tcp://*:1"}}, "rpc.endpoints must be a list of strings"),
    ({"storage": {"domains": []}}, "storage.domains"),
    ({"storage": {"domains": {"../x": "/srv/d"}}}, "'../x' is not a domain's UUID"),
    ({"storage": {"domains": {"5a8e0c64-1f61-4b52-9d51-3b8e2f6d7c10": 5}}}, "must be a path"),
    ({"storage": {"domains": {"5a8e0c64-1f61-4b52-9d51-3b8e2f6d7c10": ""}}}, "must be a path"),
])
def test_bad_config_is_refused(overrides, words):
    with pytest.raises(configmod.ConfigError, match=words.replace(".", r"\.")):
        configmod.load(overrides=overrides)


def test_bad_config_files(tmp_path):
    with pytest.raises(configmod.ConfigError, match="unknown key 'nope'"):
        (tmp_path / "u.toml").write_text("nope = 1\n")
        configmod.load(tmp_path / "u.toml")
    (tmp_path / "b.toml").write_text("this is = not [toml\n")
    with pytest.raises(configmod.ConfigError):
        configmod.load(tmp_path / "b.toml")
    with pytest.raises(configmod.ConfigError):
        configmod.load(tmp_path / "missing.toml")


def _leaves(table: dict, at: tuple = ()):
    for key, value in table.items():
        if isinstance(value, dict) and key != "domains":
            yield from _leaves(value, at + (key,))
        else:
            yield at + (key,), value


def _nested(path: tuple, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


@pytest.mark.parametrize("path", [p for p, _ in _leaves(configmod.DEFAULTS)],
                         ids=lambda p: ".".join(p))
def test_every_key_refuses_values_of_the_wrong_kind(path, no_xdg):
    """Every key of the config, given each TOML value of another kind than its default's:
    refused by name (ConfigError), or kept as a value of its default's kind (an integer
    where a number is wanted). Never a TypeError at start-up, and never "false" read as
    true (`debug = "false"` once turned the debug verbs on)."""
    default = dict(_leaves(configmod.DEFAULTS))[path]
    for wrong in (5, -1, 0, 1.5, "x", "false", "", True, False, [], ["x"], {}, {"a": 1},
                  "a\nb", "x" * 5000):
        if type(wrong) is type(default) or (default is None and isinstance(wrong, str) and
                                            wrong.isprintable() and len(wrong) <= 4096):
            continue
        try:
            cfg = configmod.load(overrides=_nested(path, wrong))
        except configmod.ConfigError:
            continue
        value = cfg.data
        for key in path:
            value = value[key]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        assert numeric and isinstance(value, (int, float)) and not isinstance(value, bool), \
            (path, wrong, value)
