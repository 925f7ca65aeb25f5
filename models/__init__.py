"""Training code: what runs on a bare GPU box.

Owns the text layer (normalisation, N'Ko checks, transliteration, CER), vocabularies,
snapshots and splits, the sample corpus builder, Whisper feature extraction and import, the
acoustic model (trajectory scalars, TAR, TTT), the trainer, decoding and scoring, and the
leaf helpers every layer shares: ``models.errors`` (the base class of user-fixable errors)
and ``models.files`` (hashing, atomic writes).

May import: the standard library and third-party packages only. It imports nothing of
``state``, ``agp``, ``backend``, ``console`` or the CLI root (import-linter contract
``models-alone`` in pyproject.toml), so a trainer started as a subprocess loads none of them.
"""
