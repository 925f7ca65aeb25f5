"""The state layer: the one owner of ``state.db``.

Owns the schema, its migrations, the typed records and every write to the store. Imports
nothing from the CLI root, ``console``, ``backend`` or ``agp``; from ``models`` only the
leaf helpers (errors, files). Everything above reads and writes state.db through here.
"""
