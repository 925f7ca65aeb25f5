"""The CLI root: the ``nko-ops`` command (``cli/root.py``, entry point ``cli.root:main``).

Owns: composing every area's sub-app into one command line, loading each one only when it
is invoked (so ``nko-ops --help`` and ``nko-ops text …`` never import torch, textual or the
cloud SDKs), handling user errors (``models.errors.NkoOpsError``) once — one line on stderr,
exit 2 — and the commands that join layers: ``console`` and ``sandbox`` (which opens the
console on a sandbox built by ``backend.sandbox``) and ``demo``.

May import: everything below it (console, backend, agp, state, models). Nothing imports
``cli``. The trainer subprocess does not go through here: it runs ``python -m
models.train_cli`` so that a GPU box loads the training code alone.
"""
