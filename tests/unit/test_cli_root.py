"""The CLI root (cli/root.py): sub-apps load only when invoked (light commands never import
torch), the trainer subprocess loads models/ alone, and a user error is handled once at the
root: one line on stderr, exit 2; a bug keeps its traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import train_helpers as H
from cli import root
from cli.root import SUBCOMMANDS, Sub, app
from models.errors import NkoOpsError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "whisper", "textual", "mlx", "mlx_lm", "paramiko", "vastai", "matplotlib")
UPPER = ("backend", "agp", "console", "cli", "state")

# Runs a module as __main__ with argv, then prints (as JSON on the last line of stdout) the
# modules it imported: sys.modules at exit, so every import is seen, lazy or not.
PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print("\\nMODULES " + json.dumps(sorted(sys.modules))))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def imported(module: str, *args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    """(the finished process, the top-level packages it imported)."""
    done, names = imported_modules(module, *args, cwd=cwd)
    return done, {m.split(".")[0] for m in names}


def imported_modules(module: str, *args: str, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    marker = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    assert marker, done.stdout[-2000:] + done.stderr[-2000:]
    return done, set(json.loads(marker[-1][len("MODULES "):]))


@pytest.mark.parametrize("args", [["--help"], ["text", "to-nko", "i ye san joli ye"], ["text", "--help"],
                                  ["text", "cer", "--ref", "ߌ ߦߋ", "--hyp", "ߌ ߦߋ"]])
def test_light_commands_import_no_torch_and_no_other_area(args):
    done, mods = imported("cli", *args)
    assert done.returncode == 0, done.stderr
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert not mods & {"backend", "agp", "console", "state"}, sorted(mods & {"backend", "agp", "console", "state"})
    if args[:2] == ["text", "to-nko"]:
        assert "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ" in done.stdout


@pytest.mark.parametrize("args", [["sample", "--help"], ["features", "describe", "STORE"], ["matrix", "--help"],
                                  ["agp", "--help"], ["vast", "--help"], ["thunder", "--help"]])
def test_commands_that_need_no_torch_do_not_import_it(args, tmp_path):
    if "STORE" in args:
        from models.features import FeatureWriter, make_recipe

        with FeatureWriter(tmp_path / "store", make_recipe("log-mel", "trimmed", 2)) as w:
            w.add("a", __import__("numpy").zeros((3, 80), dtype="float16"))
        args = [str(tmp_path / "store") if a == "STORE" else a for a in args]
    done, mods = imported("cli", *args)
    assert done.returncode == 0, done.stderr
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_the_features_constants_are_whispers():
    import whisper.audio

    from models import features

    for name in ("SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "N_SAMPLES", "N_FRAMES"):
        assert getattr(features, name) == getattr(whisper.audio, name), name


def test_root_help_lists_every_area_without_loading_it():
    done, mods = imported_modules("cli", "--help")
    for name in SUBCOMMANDS:
        assert f" {name} " in done.stdout, name
    ours = {m for m in mods if m.split(".")[0] in ("models", "backend", "agp", "console", "state")}
    assert ours == {"models", "models.errors"}  # not even the text layer: the listing is the root's own table


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_listed_help_is_the_sub_apps_own(name):
    cmd = root.load(name)
    assert cmd.name == name
    own = " ".join((cmd.help or "").split("\n\n")[0].split())
    assert SUBCOMMANDS[name].help == own


def test_the_trainer_subprocess_imports_models_alone(tmp_path):
    cfg = H.build(tmp_path / "data", n=24)
    cfg["train"].update(epochs=1, batch_size=4)
    cfg["out_dir"] = str(tmp_path / "run")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    done, mods = imported("models.train_cli", "train", "--config", str(path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "manifest.json").exists()  # a real, complete run
    assert "torch" in mods and "models" in mods
    assert not mods & set(UPPER), sorted(mods & set(UPPER))


def test_the_executors_start_the_trainer_module():
    from backend.executor_local import __file__ as local_py
    from backend.vast.remote import __file__ as remote_py

    for src in (local_py, remote_py):
        text = Path(src).read_text(encoding="utf-8")
        assert '"-m", "models.train_cli", "train", "--config"' in text, src
        assert "backend.cli" not in text, src


# ------------------------------------------------------------------ errors, handled once


class Refused(NkoOpsError, ValueError):
    pass


def refusing_cmd(what: str = typer.Option("user", "--what")) -> None:
    """A command that fails the way its argument says."""
    if what == "user":
        raise Refused("configs/x.toml: field 'cap_usd': must be a number, got 'ten'")
    raise RuntimeError("a bug, not the user's doing")


@pytest.fixture
def refusing(monkeypatch):
    monkeypatch.setitem(SUBCOMMANDS, "refusing", Sub(__name__, "refusing_cmd", "A command that fails."))
    monkeypatch.setitem(root._LOADED, "refusing", root.load("refusing"))
    monkeypatch.setenv("NKO_OPS_TRACEBACK", "")


def test_a_user_error_is_one_line_and_exit_2(refusing):
    r = CliRunner().invoke(app, ["refusing", "--what", "user"])
    assert r.exit_code == 2
    assert r.output == "error: configs/x.toml: field 'cap_usd': must be a number, got 'ten'\n"
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_a_bug_keeps_its_traceback(refusing):
    r = CliRunner().invoke(app, ["refusing", "--what", "bug"])
    assert isinstance(r.exception, RuntimeError)  # not swallowed into one line


def test_developers_get_the_traceback_of_a_user_error(refusing, monkeypatch):
    monkeypatch.setenv("NKO_OPS_TRACEBACK", "1")
    r = CliRunner().invoke(app, ["refusing", "--what", "user"])
    assert isinstance(r.exception, Refused)


def test_a_real_bad_file_is_one_line_naming_file_and_field(tmp_path):
    bad = tmp_path / "vast.toml"
    bad.write_text('disk_gb = "ten"\n')
    done = subprocess.run([sys.executable, "-m", "cli", "vast", "offers", "--settings", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: {bad}: field 'disk_gb': must be a number, got 'ten'\n"
    assert done.stdout == ""


def test_every_user_error_class_subclasses_the_one_base():
    import importlib
    import inspect
    import re

    missing = []
    for pkg in ("models", "backend", "agp", "console", "state"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            names = re.findall(r"^class (\w*Error|LaneDown)\(", text, re.M)
            if not names or path.name == "remote_helper.py":  # copied alone to instances: imports nothing of ours
                continue
            mod = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for name in names:
                cls = getattr(mod, name)
                if inspect.isclass(cls) and not issubclass(cls, NkoOpsError) and name != "CloudError":
                    missing.append(f"{path.relative_to(ROOT)}:{name}")
    assert not missing  # CloudError: the emulator's HTTP status to its own clients, never shown to a user
