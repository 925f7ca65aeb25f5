"""The Textual operations console: panes (matrix, gate, instances, adapters, logs, sync), their
read-only queries of state.db, N'Ko display order, and the console's cloud actions
(``console/ops.py``: kill idle, destroy, sweep, sync, live logs over SSH).

May import: ``backend``, ``agp``, ``state`` and ``models`` (layers contract in
pyproject.toml). Never the CLI root, which sits above it and starts it.
"""
