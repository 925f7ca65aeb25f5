"""The state store's users: the run matrix and its plan, executors (local, Vast), providers,
the Vast lane (fleet, cost and budget, idle detection, sync into the verified store, guards,
emulator), Thunder adapter runs (the MLX ring), run import, verification and promotion,
tables, claims and statistics, the sandbox and the demo.

May import: ``agp``, ``state`` and ``models`` (layers contract in pyproject.toml). Never
``console`` or the CLI root: a command-line sub-app here is composed by the CLI root, not the
other way round.
"""
