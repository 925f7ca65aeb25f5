"""SSH log line → console screen latency (issue 8: within 1 s, p95).

Starts a real OpenSSH sshd on 127.0.0.1 (the fixture code of tests/vast_helpers.py), the Vast
API emulator with one instance mapped to it (created through the real ``vastai`` SDK and
registered for a run by the lane's Fleet), and the console headless (Textual ``run_test``)
following that run in the Logs tab, i.e. tailing ``train.log`` over SSH/SFTP. Then appends
``--lines`` lines to that file on the sshd side, each after a random pause (so the appends
fall at every phase of the tail's poll), and measures from the append (written and closed)
to the line being written into the log view on the UI thread.

    .venv/bin/python benchmarks/console_log_latency.py [--lines 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from state import store  # noqa: E402
from backend.vast.config import BudgetSettings, load_settings, state_dir_for  # noqa: E402
from backend.vast.emulator import Cloud, Emulator  # noqa: E402
from backend.vast.fleet import Fleet  # noqa: E402
from backend.vast.provider import VastProvider  # noqa: E402
from console.app import ConsoleApp  # noqa: E402
from console.panes import logs as logs_pane  # noqa: E402
from vast_helpers import _start_sshd  # noqa: E402


def setup(tmp: Path) -> tuple[Path, Path, Path, object, object]:
    """sshd + emulator + one running instance with a run; returns (db, vast.toml, train.log, sshd, emulator)."""
    sshd = _start_sshd(tmp / "sshd")
    key = "vk_" + secrets.token_hex(20)
    os.environ["VAST_API_KEY"] = key
    os.environ["VASTAI_NO_UPDATE_CHECK"] = "1"
    workspace = tmp / "remote"
    emu = Emulator(Cloud(api_key=key, ssh_host="127.0.0.1", ssh_port=sshd.port, workspace_base=workspace)).start()
    toml = tmp / "vast.toml"
    toml.write_text(f'server_url = "{emu.url}"\nremote_base = "{workspace}"\nssh_key = "{sshd.client_key}"\n'
                    f'remote_python = "{sys.executable}"\n')
    db_path = tmp / "state" / "state.db"
    db = store.open_db(db_path)
    settings = load_settings(toml, state_dir=state_dir_for(db_path))
    provider = VastProvider(key, emu.url, backoff_s=0.05)
    fleet = Fleet(db, settings, BudgetSettings(source="bench"), provider, log=lambda s: None)
    offer = provider.offers("num_gpus=1", "dph_total", limit=5, storage_gb=settings.disk_gb)[0]
    iid = provider.create(offer.id, "pytorch/pytorch", settings.disk_gb, label="bench-run")
    fleet.register(iid, "bench-run", "bench-run", offer.raw)
    deadline = time.monotonic() + 10
    while provider.instance(iid)["actual_status"] != "running":
        assert time.monotonic() < deadline, "instance did not start"
        time.sleep(0.05)
    fleet.poll()
    store.upsert_run(db, "bench-run", executor="vast", instance_id=str(iid), status="running")
    log = workspace / str(iid) / "runs" / "bench-run" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("epoch 0 started\n")
    fleet.close()
    db.close()
    return db_path, toml, log, sshd, emu


async def measure(db_path: Path, toml: Path, log: Path, lines: int, seed: int) -> list[float]:
    app = ConsoleApp(db_path, interval=2.0, vast_settings=toml, budget=None, cloud_poll=0)
    seen: dict[str, float] = {}
    rng = random.Random(seed)
    latencies = []
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        app.open_logs("run", "bench-run")
        pane = app.query_one("#logs", logs_pane.LogsPane)
        original = pane._append

        def append(source, new_lines) -> None:  # the UI-thread step that writes into the log view
            original(source, new_lines)
            t = time.perf_counter()
            for line in new_lines:
                seen.setdefault(line.text, t)

        pane._append = append
        while "epoch 0 started" not in seen:
            await asyncio.sleep(0.05)
        for i in range(lines):
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            text = f"probe {i} {secrets.token_hex(4)}"
            t0 = time.perf_counter()
            with open(log, "a") as f:
                f.write(text + "\n")
            while text not in seen:
                await asyncio.sleep(0.005)
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"line {i} did not arrive within 30 s")
            latencies.append(seen[text] - t0)
        assert text in pane.shown_text()  # on screen, not only received
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db_path, toml, log, sshd, emu = setup(Path(tmp))
        try:
            lat = asyncio.run(measure(db_path, toml, log, args.lines, args.seed))
        finally:
            emu.stop()
            sshd.stop()
    lat.sort()

    def q(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, round(p * (len(lat) - 1)))]

    print(f"{len(lat)} lines appended on the sshd side, tail poll every {logs_pane.SSH_POLL_S:g} s: "
          f"median {1000 * statistics.median(lat):.0f} ms, p95 {q(0.95):.0f} ms, max {1000 * lat[-1]:.0f} ms, "
          f"min {1000 * lat[0]:.0f} ms")
    print("target p95 < 1000 ms: " + ("met" if q(0.95) < 1000 else "NOT met"))


if __name__ == "__main__":
    main()
