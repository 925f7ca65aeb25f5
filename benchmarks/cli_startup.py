"""Start-up time of the ``nko-ops`` command: wall seconds per run of a few commands, and the
heavy packages each one imports (sys.modules at exit).

    .venv/bin/python benchmarks/cli_startup.py [--runs 10] [--python-m cli]

``--python-m MODULE`` runs ``python -m MODULE`` instead of the ``nko-ops`` entry script (for a
before/after comparison against an older root, e.g. ``--python-m backend.cli`` with that
tree on PYTHONPATH). Commands that need no torch should start in under 0.3 s on an idle
machine; a busy one inflates every number (say so when you record them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "whisper", "textual", "mlx", "mlx_lm", "paramiko", "vastai", "matplotlib", "sqlite_utils")
PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: sys.stderr.write("\\nMODULES " + json.dumps(sorted({m.split('.')[0] for m in sys.modules})) + "\\n"))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def commands(tmp: Path) -> dict[str, list[str]]:
    return {
        "--help": ["--help"],
        "text to-nko": ["text", "to-nko", "i ye san joli ye"],
        "matrix validate": ["matrix", "validate", str(ROOT / "configs/matrix/demo.json")],
        "features extract (torch)": ["features", "extract", "--snapshot", str(ROOT / "data/sample"), "--out",
                                     str(tmp / "features"), "--whisper", "log-mel", "--limit", "2", "--no-progress"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--python-m", default=None, help="Run `python -m MODULE` instead of the nko-ops script.")
    args = ap.parse_args()
    module = args.python_m or "cli"
    script = [sys.executable, "-m", module] if args.python_m else [str(Path(sys.executable).with_name("nko-ops"))]
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in commands(Path(tmp)).items():
            times = []
            for _ in range(args.runs):
                subprocess.run(["rm", "-rf", str(Path(tmp) / "features")], check=True)
                t = time.perf_counter()
                done = subprocess.run(script + argv, cwd=ROOT, capture_output=True, text=True)
                times.append(time.perf_counter() - t)
                if done.returncode != 0:
                    sys.exit(f"{name}: exit {done.returncode}: {done.stderr[-500:]}")
            subprocess.run(["rm", "-rf", str(Path(tmp) / "features")], check=True)
            probe = subprocess.run([sys.executable, "-c", PROBE, module, *argv], cwd=ROOT, capture_output=True,
                                   text=True, env={**os.environ})
            mods = json.loads(next(line for line in probe.stderr.splitlines() if line.startswith("MODULES "))[8:])
            print(f"{name:<26} mean {statistics.mean(times):.3f} s  min {min(times):.3f} s  "
                  f"heavy imports: {', '.join(m for m in HEAVY if m in mods) or 'none'}")


if __name__ == "__main__":
    main()
