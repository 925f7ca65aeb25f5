"""Acoustic scoring of AGP proposals on the demo's N'Ko runs (issue 15: "the demo's rows a
few seconds here").

    nice .venv/bin/python benchmarks/score_speed.py            # every N'Ko run under work/demo/runs
    nice .venv/bin/python benchmarks/score_speed.py --runs work/demo/runs/demo-nko-baseline --repeat 5

For each run with a best.pt: its test rows, one proposal per row (the ASR text with one
N'Ko-aware perturbation from agp/corpus.py: the scoring cost does not depend on what the
proposal says), scored with ``models.score.Scorer`` on CPU: one forward pass per batch of
utterances and one ``ctc_loss`` call for the proposal and ASR label sequences of the batch.
Reports the model/store load time and the scoring time (best of ``--repeat``), and checks
the batched scores against one-utterance-at-a-time scores.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agp.corpus import PERTURBATIONS, perturb  # noqa: E402
from models.bundle import read_predictions  # noqa: E402
from models.score import Scorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    os.chdir(ROOT)  # the demo runs record their feature store relative to the repository
    runs = args.runs or sorted(p for p in (ROOT / "work" / "demo" / "runs").glob("demo-nko-*") if (p / "best.pt").exists())
    if not runs:
        sys.exit("no N'Ko run with best.pt under work/demo/runs: run `nko-ops demo` first")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for run in runs:
        rows = read_predictions(run / "test_predictions.jsonl")
        rng = random.Random(0)
        props = [perturb(r.asr_text, rng.choice(PERTURBATIONS), rng) or r.asr_text for r in rows]
        t0 = time.perf_counter()
        scorer = Scorer.from_run(run, device=args.device)
        t_load = time.perf_counter() - t0
        ids, asr = [r.feat_id for r in rows], [r.asr_text for r in rows]
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            scores = scorer.score(ids, asr, props)
            best = min(best, time.perf_counter() - t0)
        single = Scorer.from_run(run, device=args.device, max_batch_frames=1).score(ids, asr, props)
        worst = max(abs(a.logp_proposal - b.logp_proposal) for a, b in zip(scores, single)
                    if a.logp_proposal is not None)
        frames = sum(s.frames for s in scores)
        print(f"{run.name}: {len(rows)} rows ({frames} output frames), load {t_load:.2f} s, "
              f"score {best:.3f} s (best of {args.repeat}) = {len(rows) / best:,.0f} rows/s; "
              f"unscored {sum(s.delta is None for s in scores)}; batched vs one-by-one max |Δlogp| {worst:.2e}")


if __name__ == "__main__":
    main()
