"""The one base class for errors a user can fix (bad input, a missing file, a refused action).

The CLI root catches ``NkoOpsError`` once and prints its message as one line (which names the
file and the field) with exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NkoOpsError(Exception):
    """A refusal or bad input, reported to the user as one line; never a bug."""


class FeatureError(NkoOpsError, ValueError):
    """Bad input to the feature store or to the Whisper weight readers (models/features.py,
    models/whisper_weights.py); the message names the feat_id or file at fault."""
