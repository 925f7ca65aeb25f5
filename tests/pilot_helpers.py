"""Helpers for the tests that drive the console with Textual's Pilot (tests/functional/,
tests/e2e/test_sandbox.py)."""

from __future__ import annotations

import asyncio
import time

from textual.widgets import DataTable, Static


async def wait_for(pilot, cond, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await pilot.pause()
        await asyncio.sleep(0.05)
    await pilot.pause()


def rows(app, table_id: str) -> list[list[str]]:
    table = app.query_one(table_id, DataTable)
    return [[str(c) for c in table.get_row(k)] for k in table.rows]


def text_of(node, widget_id: str) -> str:
    return str(node.query_one(widget_id, Static).render())
