"""The AGP post-ASR correction lane: prediction rows, partitions and their calibration, the
training corpus, proposers (lexicon, N-best, HTTP), the gate and its policy, evaluation
(ungated vs gated, with CIs), the acoustic-margin frontier, and the lane's records (proposals,
decisions, reviews) through the state layer.

May import: ``state`` and ``models`` (layers contract in pyproject.toml). Never ``backend``,
``console`` or the CLI root (contract ``agp-below-backend``): the backend hands the lane its
completed runs, the lane does not reach up for them.
"""
