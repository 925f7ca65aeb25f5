"""Acoustic scoring of AGP proposals at V3 scale on one GPU (issue 15 target: the 29,060
test rows of a V3 run in under a minute).

    python benchmarks/gpu_score_v3.py                          # H100/H200, both modes
    python benchmarks/gpu_score_v3.py --mode trajectory --rows 29060 --unique 2048
    python benchmarks/gpu_score_v3.py --device cpu --preset tiny --dim 64 --rows 64 --unique 16   # smoke test

What is timed is ``models.score.Scorer.score``, the code the lane runs: batches of
utterances sorted by length, one forward pass of the full-size V3 head (46.9M parameters,
random weights: the cost does not depend on them) per batch, and one ``ctc_loss`` call for
the proposal and ASR label sequences of the batch. Features come from a real feature store
written by ``models.features.FeatureWriter`` in a temporary directory: ``--unique`` clips of
375 frames x 1280 dims (fp16; the Whisper-large-v3 encoder output mean-pooled 1500 -> 375,
1 GiB per 1,100 clips), cycled over ``--rows`` rows, so the memory-mapped reads are real but
mostly from the page cache (a cold 29,060-clip store is 28 GB). Texts: random N'Ko strings
of ``--label-len`` characters, the proposal one character off the ASR text. Prints rows/s,
the 29,060-row time and PASS/FAIL against 60 s. Not runnable on the 2-core build box at
full size; record results in benchmarks/README.md with the card.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.features import FeatureStore, FeatureWriter, recipe_hash  # noqa: E402
from models.model import CTCModel, make_dims  # noqa: E402
from models.score import Scorer  # noqa: E402
from models.vocab import Vocab  # noqa: E402

TEST_ROWS = 29_060


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["baseline", "trajectory", "both"], default="both")
    ap.add_argument("--rows", type=int, default=TEST_ROWS)
    ap.add_argument("--unique", type=int, default=2048, help="distinct clips written to the feature store")
    ap.add_argument("--frames", type=int, default=375)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--preset", default="v3")
    ap.add_argument("--label-len", type=int, default=60)
    ap.add_argument("--max-batch-frames", type=int, default=64 * 375)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.rows} rows over {args.unique} clips of "
          f"{args.frames}x{args.dim}")
    vocab = Vocab.for_script("nko")
    letters = [s for s in vocab.symbols[1:] if "\u07ca" <= s <= "\u07ea"]
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = {"name": "benchmark-random", "dim": args.dim, "frame_rate": 12.5, "dtype": "float16"}
        recipe["hash"] = recipe_hash(recipe)
        t0 = time.perf_counter()
        gen = np.random.default_rng(0)
        with FeatureWriter(Path(tmp) / "features", recipe) as w:
            for i in range(args.unique):
                w.add(f"clip_{i:06d}", gen.standard_normal((args.frames, args.dim), dtype=np.float32))
        store = FeatureStore.open(Path(tmp) / "features")
        print(f"feature store written in {time.perf_counter() - t0:.1f} s")
        ids = [f"clip_{i % args.unique:06d}" for i in range(args.rows)]
        asr, props = [], []
        for _ in range(args.rows):
            words = [("".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))) for _ in range(30)]
            text = " ".join(words)[: args.label_len].strip()
            asr.append(text)
            i = rng.randrange(len(text))
            props.append(text[:i] + rng.choice(letters) + text[i + 1:])
        for mode in (["baseline", "trajectory"] if args.mode == "both" else [args.mode]):
            torch.manual_seed(0)
            dims = make_dims(args.preset, n_input=args.dim)
            model = CTCModel(dims, trajectory=mode == "trajectory").to(dev)
            scorer = Scorer(model, vocab, store, dev, "random-v3", args.max_batch_frames)
            scorer.score(ids[:64], asr[:64], props[:64])  # warm-up (kernels, allocator)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            scores = scorer.score(ids, asr, props)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            at_full = dt * TEST_ROWS / args.rows
            print(f"{mode}: {args.rows} rows in {dt:.2f} s = {args.rows / dt:,.0f} rows/s "
                  f"({model.num_params() / 1e6:.1f}M params); 29,060 rows: {at_full:.1f} s "
                  f"{'PASS' if at_full < 60 else 'FAIL'} (< 60 s); unscored {sum(s.delta is None for s in scores)}")


if __name__ == "__main__":
    main()
