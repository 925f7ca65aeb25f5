"""The state layer: the one owner of ``state.db``.

Owns the schema, its migrations, the typed records and every write to the store: no module
outside ``state/`` runs an INSERT, UPDATE or DELETE. Everything above (``agp``, ``backend``,
``console``, the CLI root) reads and writes state.db through here; the console only reads
(its query modules), apart from review verdicts through ``state.agp.add_review``.

May import: the standard library, ``sqlite_utils``, and from ``models`` only the leaf
helpers ``models.errors`` and ``models.files``. Never ``agp``, ``backend``, ``console`` or
the CLI root (nor the rest of ``models``: the state layer knows nothing of training).

Where each concept lives:

* ``store``: opening the file (WAL, busy timeout, read-only mode), the schema and its
  ``MIGRATIONS``, ``transaction``, and the executors' core tables: ``events``, ``runs``
  (``upsert_run``, ``set_run_status``, ``heartbeat``), ``metrics`` and ``artifacts``.
* ``records``: typed records (dataclasses) of the rows, and the ``RunStatus`` /
  ``SyncState`` enums.
* ``data``: ``snapshots`` and ``splits`` (data identities, one writer each).
* ``agp``: the AGP lane's ``proposals``, ``gate_decisions`` and ``reviews``.
* ``adapters``: Thunder adapter runs (``adapter_runs``, ``adapter_metrics``).
* ``promotions``: ``promotions`` rows.
* ``fleet`` / ``execution``: cloud instances, cost samples, budgets and the executors'
  bookkeeping (matrices, run claims).
"""
