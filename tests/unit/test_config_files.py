"""Config files read through pydantic models (models/validation.py): every kind refuses an
unknown key and a wrong type with one line naming the file and the field; and the shared file
helpers (models/files.py): hashing and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from agp.gate import DEFAULT_POLICY, GateError, load_gate_policy
from backend.thunder.config import ConfigError as ThunderConfigError
from backend.thunder.config import load_config
from backend.vast.config import VastConfigError, load_budget, load_settings
from models.files import CHUNK, atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

THUNDER = """python = "/v/bin/python"
workdir = "/w"
model = "/m"
data = "/d"
run_root = "/r"
[[hosts]]
name = "a"
ip = "10.0.0.1"
kind = "local"
[[hosts]]
name = "b"
ip = "10.0.0.2"
kind = "local"
"""


def _one_line(e: pytest.ExceptionInfo, path, field: str, *rest: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}: field '{field}': "), msg
    for part in rest:
        assert part in msg, (part, msg)
    return msg


# --------------------------------------------------------------------------- one test per config kind

def test_gate_policy_unknown_key_and_wrong_type(tmp_path):
    good = DEFAULT_POLICY.read_text(encoding="utf-8")
    p = tmp_path / "gate.toml"
    p.write_text("colour = 'red'\n" + good, encoding="utf-8")
    with pytest.raises(GateError) as e:
        load_gate_policy(p)
    _one_line(e, p, "colour", "unknown field", "known: acoustic, allowed_punctuation, budget")
    p.write_text(good.replace("relative = 0.15", "relative = 'half'", 1), encoding="utf-8")
    with pytest.raises(GateError) as e:
        load_gate_policy(p)
    _one_line(e, p, "budget.boundary.relative", "must be a number, got 'half'")
    p.write_text(good.replace("version = 1", "version = '1'", 1), encoding="utf-8")
    with pytest.raises(GateError) as e:
        load_gate_policy(p)
    _one_line(e, p, "version", "must be an integer, got '1'")


def test_vast_settings_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "vast.toml"
    p.write_text("disk_gb = 80\nssh_usr = 'root'\n")
    with pytest.raises(VastConfigError) as e:
        load_settings(p)
    _one_line(e, p, "ssh_usr", "unknown field", "ssh_user")
    p.write_text("[idle]\nheartbeat_timeout_s = true\n")
    with pytest.raises(VastConfigError) as e:
        load_settings(p)
    _one_line(e, p, "idle.heartbeat_timeout_s", "must be a number, got True")
    p.write_text("[mirror]\nhost = 'h'\npath = '/p'\nport = 70000\n")
    with pytest.raises(VastConfigError) as e:
        load_settings(p)
    _one_line(e, p, "mirror.port", "must be a TCP port (1-65535), got 70000")


def test_budget_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "budget.toml"
    p.write_text("[budget]\ncap_usd = 5\nsource = 'me'\n")  # `source` is set by the loader, never by the file
    with pytest.raises(VastConfigError) as e:
        load_budget(p)
    _one_line(e, p, "budget.source", "unknown field")
    p.write_text("[budget]\ncap_usd = 5\nname = 7\n")
    with pytest.raises(VastConfigError) as e:
        load_budget(p)
    _one_line(e, p, "budget.name", "must be a string, got 7")
    p.write_text("[budget]\ncap_usd = 5\n")
    b = load_budget(p)
    assert (b.cap_usd, b.warn_usd, b.source) == (5, 4, str(p))


def test_thunder_config_unknown_key_and_wrong_type(tmp_path):
    p = tmp_path / "cluster.toml"
    p.write_text(THUNDER + "[watchdog]\nwindow = 3\n")
    with pytest.raises(ThunderConfigError) as e:
        load_config(p)
    _one_line(e, p, "watchdog.window", "unknown field", "window_s")
    p.write_text(THUNDER + "[train]\nbatch_size = 'two'\n")
    with pytest.raises(ThunderConfigError) as e:
        load_config(p)
    _one_line(e, p, "train.batch_size", "'two'")
    p.write_text(THUNDER)
    assert load_config(p).hosts[1].ip == "10.0.0.2"


# --------------------------------------------------------------------------- models/files.py

@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 17])
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_atomic_write_leaves_no_temp_file_and_the_old_file_on_error(tmp_path):
    p = tmp_path / "sub" / "out.json"
    atomic_write_text(p, "old\n")
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # type: ignore[arg-type]  # fails after the temp file is open
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.json"]
    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": object()})  # not serialisable: nothing is written
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.json"] and p.read_text() == "old\n"


def test_atomic_write_json_bytes_are_the_projects_json(tmp_path):
    obj = {"b": "ߌ ߦߋ", "a": [1, 2.5, None]}
    p = tmp_path / "x.json"
    atomic_write_json(p, obj, sort_keys=True)
    assert p.read_bytes() == (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode()
    atomic_write_json(p, obj, indent=None)
    assert p.read_bytes() == (json.dumps(obj, ensure_ascii=False) + "\n").encode()
