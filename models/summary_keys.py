"""The names in a prediction row's ``trajectory_scalars`` (CONTRACTS §4), without torch, so
the AGP lane can check rows without loading the model code.

Each of the 7 trajectory scalars (models/trajectory.py) is summarised over an utterance's
frames by mean/std/min/max; the CTC summaries come from the output distribution
(models/decode.py ``summarise``)."""

SCALARS = ("commitment", "uncertainty", "transition_pressure", "recovery_margin",
           "phase_stiffness", "novelty", "stability")
SUMMARY_KEYS = tuple(f"{s}_{stat}" for s in SCALARS for stat in ("mean", "std", "min", "max")) + (
    "ctc_confidence_mean", "ctc_confidence_min", "ctc_nonblank_confidence_mean", "ctc_nonblank_confidence_min",
    "ctc_blank_fraction", "ctc_frames")
