"""AGP gate throughput: decisions per second on a Paper-4-sized test split (29,060 rows).

Rows are real N'Ko sentences from the sample corpus (cycled to 29,060 distinct feat_ids),
with ASR-like errors made by the corpus perturbations and partitions spread over all four.
Proposals mix plausible repairs, wrong repairs and adversarial text (Latin and Arabic
script, bidi overrides, control characters, 10x length). Only ``Gate.decide`` is timed for
the headline number; the whole `nko-ops agp gate` path (read and validate rows and proposals,
decide, write decisions) is timed too.

    nice .venv/bin/python benchmarks/gate_speed.py [--rows 29060] [--repeat 3]

Target: >= 10,000 decisions/s, i.e. 29,060 rows in < 3 s, on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agp.corpus import PERTURBATIONS, perturb  # noqa: E402
from agp.gate import Gate, load_gate_policy  # noqa: E402
from agp.lexicon import Lexicon  # noqa: E402
from agp.pipeline import gate_all, lane_rows, load_proposals  # noqa: E402
from agp.records import record_decisions  # noqa: E402
from agp.rows import write_jsonl  # noqa: E402
from models.bundle import PARTITIONS  # noqa: E402
from state.store import open_db  # noqa: E402
from models.text import row_edits, target_text  # noqa: E402

ADVERSARIAL = ["san joli", "مرحبا", "\u202e", "\u200f", "\x00", "\x07", "\ufeff", "ABC"]


def _noisy(text: str, rng: random.Random) -> str:
    """The first perturbation (in random order) that applies to ``text``."""
    for kind in rng.sample(PERTURBATIONS, len(PERTURBATIONS)):
        out = perturb(text, kind, rng)
        if out is not None:
            return out
    return text


def make_inputs(n: int, seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    refs = [target_text(json.loads(line)["nko"], "nko")
            for line in (ROOT / "data" / "sample" / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    refs = [r for r in refs if r]
    rng = random.Random(seed)
    rows, proposals = [], []
    for i in range(n):
        ref = refs[i % len(refs)]
        asr = _noisy(ref, rng)
        edits, chars = row_edits(ref, asr)
        fid = f"bench_{i:06d}"
        rows.append({"feat_id": fid, "audio_id": f"aud_{i // 3:06d}", "split": "test", "script": "nko",
                     "mode": "trajectory", "asr_text": asr, "reference_text": ref, "cer_edits": edits,
                     "reference_chars": chars, "trajectory_scalars": {"uncertainty_mean": rng.random()},
                     "partition": PARTITIONS[i % 4]})
        kind = i % 6
        if kind == 0:
            p = ref  # the right repair
        elif kind == 1:
            p = _noisy(asr, rng)  # a wrong one
        elif kind == 2:
            p = asr  # abstain
        elif kind == 3:
            cut = rng.randrange(len(asr) + 1)
            p = asr[:cut] + rng.choice(ADVERSARIAL) + asr[cut:]
        elif kind == 4:
            p = " ".join([asr] * 10)
        else:
            p = "\u202b" + ref + "\u202c"  # right repair wrapped in bidi embedding
        # an acoustic score as models/score.py writes it (1 in 12 unscored): rule acoustic runs on
        # boundary and uncertain rows; the gate only reads the number
        delta = None if i % 12 == 5 else round(rng.gauss(-0.02, 0.05), 6)
        proposals.append({"feat_id": fid, "proposal": p, "acoustic": {"delta": delta, "normalisation": "per_frame"}})
    return rows, proposals, refs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=29060)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    rows_raw, props_raw, refs = make_inputs(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("NKO_OPS_HOME", tmp)
        tmp = Path(tmp)
        write_jsonl(tmp / "rows.jsonl", rows_raw)
        write_jsonl(tmp / "proposals.jsonl", props_raw)
        lex = Lexicon.from_references(refs[: len(refs) * 8 // 10])  # "training" share of the sample

        t0, c0 = time.perf_counter(), time.process_time()
        rows, ppolicy = lane_rows(tmp / "rows.jsonl")
        proposals = load_proposals(tmp / "proposals.jsonl", rows)
        gate = Gate(load_gate_policy(), lex, ppolicy.identity)
        t_load, c_load = time.perf_counter() - t0, time.process_time() - c0

        by_id = {r.feat_id: r for r in rows}
        triples = [(by_id[p["feat_id"]], p["proposal"], p["acoustic"]["delta"]) for p in proposals]
        best = best_cpu = float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            decisions = [gate.decide(r, p, d) for r, p, d in triples]
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)

        t0, c0 = time.perf_counter(), time.process_time()
        decisions = gate_all(gate, rows, proposals)
        write_jsonl(tmp / "decisions.jsonl", (d.as_dict() for d in decisions))
        t_decide_write, c_decide_write = time.perf_counter() - t0, time.process_time() - c0

        # what `nko-ops agp gate` does by default on top: proposals and decisions into state.db
        t0, c0 = time.perf_counter(), time.process_time()
        db = open_db(tmp / "state.db")
        record_decisions(db, "bench", proposals, decisions, {r.feat_id: r.reference_text for r in rows})
        db.close()
        t_db, c_db = time.perf_counter() - t0, time.process_time() - c0

    accepted = sum(d.accepted for d in decisions)
    rules: dict[str, int] = {}
    for d in decisions:
        for r in d.rules:
            rules[r] = rules.get(r, 0) + 1
    print(f"rows: {len(rows)}  accepted: {accepted}  rejections by rule: {dict(sorted(rules.items()))}")
    print(f"gate.decide only (best of {args.repeat}): {best:.3f} s wall = {len(rows) / best:,.0f} decisions/s; "
          f"{best_cpu:.3f} s CPU = {len(rows) / best_cpu:,.0f} decisions/s per core")
    print(f"load average while running: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"load+validate rows and proposals: {t_load:.3f} s wall ({c_load:.3f} s CPU); "
          f"decide+write decisions.jsonl: {t_decide_write:.3f} s wall ({c_decide_write:.3f} s CPU)")
    print(f"end to end (load, decide, write): {t_load + t_decide_write:.3f} s wall "
          f"({c_load + c_decide_write:.3f} s CPU)")
    print(f"record in state.db (one transaction, WAL): {t_db:.3f} s wall ({c_db:.3f} s CPU); default "
          f"`agp gate` end to end: {t_load + t_decide_write + t_db:.3f} s wall")
    print(f"target 29,060 rows < 3 s: {'PASS' if best * 29060 / len(rows) < 3 else 'FAIL'}")


if __name__ == "__main__":
    main()
