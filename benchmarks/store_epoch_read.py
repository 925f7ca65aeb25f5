"""Feature-store epoch read vs one .npy file per utterance.

    python benchmarks/store_epoch_read.py --store DIR            # an existing feature store
    python benchmarks/store_epoch_read.py --synthetic 1000 --frames 375 --dim 1280

An "epoch" reads every id once in a random order (seeded) and touches every value (the
store's ``get`` returns a copy; ``np.load`` reads the file). Both layouts hold the same
float16 arrays. Timed warm (files in the page cache) and cold: before each cold epoch the
benchmark evicts its own files from the page cache with posix_fadvise(DONTNEED), which
leaves other processes' cache alone."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from models.features import FeatureStore, FeatureWriter, make_recipe, recipe_hash


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch_store(root: Path, order: list[str]) -> float:
    t0 = time.perf_counter()
    store = FeatureStore.open(root)  # opening (index parse) is part of the cost
    acc = 0.0
    for fid in order:
        acc += float(store.get(fid)[0, 0])
    return time.perf_counter() - t0


def epoch_npy(root: Path, order: list[str]) -> float:
    t0 = time.perf_counter()
    acc = 0.0
    for fid in order:
        acc += float(np.load(root / f"{fid}.npy")[0, 0])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="existing feature store to copy into .npy files")
    ap.add_argument("--synthetic", type=int, help="build a synthetic store of N utterances instead")
    ap.add_argument("--frames", type=int, default=375)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="store_bench_", dir=args.workdir))
    try:
        if args.store:
            store_dir, src = args.store, FeatureStore.open(args.store)
            arrays = ((fid, src.get(fid)) for fid in src.ids)
            what = f"store {args.store} ({src.recipe['name']} {src.recipe['mode']}, dim {src.dim})"
        else:
            recipe = dict(make_recipe("log-mel"), name="synthetic", dim=args.dim)
            recipe["hash"] = recipe_hash(recipe)
            store_dir = work / "store"
            rng = np.random.default_rng(0)
            with FeatureWriter(store_dir, recipe) as w:
                for i in range(args.synthetic):
                    w.add(f"u{i:06d}", rng.standard_normal((args.frames, args.dim), dtype=np.float32))
            src = FeatureStore.open(store_dir)
            arrays = ((fid, src.get(fid)) for fid in src.ids)
            what = f"synthetic store, {args.synthetic} x [{args.frames}, {args.dim}] float16"
        npy_dir = work / "npy"
        npy_dir.mkdir()
        for fid, a in arrays:
            np.save(npy_dir / f"{fid}.npy", a)
        del src, arrays
        gc.collect()  # drop the memory maps: fadvise cannot evict pages that are still mapped
        store = FeatureStore.open(store_dir)
        ids = store.ids
        store_files = [store_dir / "index.json"] + [store_dir / s["file"] for s in store.shards]
        npy_files = [npy_dir / f"{fid}.npy" for fid in ids]
        nbytes = sum(store.frames(f) for f in ids) * store.dim * 2
        print(f"{what}: {len(ids)} utterances, {nbytes / 2**20:.1f} MiB of features, "
              f"{len(store.shards)} shard(s) vs {len(npy_files)} .npy files")
        res: dict = {"utterances": len(ids), "mib": round(nbytes / 2**20, 1), "shards": len(store.shards)}
        rnd = random.Random(42)
        for cache in ("cold", "warm"):
            times = {"store": [], "npy": []}
            for _ in range(args.repeats):
                order = ids[:]
                rnd.shuffle(order)
                for layout, fn, root, files in (("store", epoch_store, store_dir, store_files),
                                                ("npy", epoch_npy, npy_dir, npy_files)):
                    if cache == "cold":
                        evict(files)
                    times[layout].append(fn(root, order))
            best = {k: min(v) for k, v in times.items()}
            res[cache] = {"store_s": round(best["store"], 3), "npy_s": round(best["npy"], 3),
                          "store_utt_per_s": round(len(ids) / best["store"]), "npy_utt_per_s": round(len(ids) / best["npy"]),
                          "npy_over_store": round(best["npy"] / best["store"], 2)}
            print(f"{cache}: store {best['store']:.3f} s ({len(ids) / best['store']:.0f} utt/s, "
                  f"{nbytes / 2**20 / best['store']:.0f} MiB/s)  npy {best['npy']:.3f} s "
                  f"({len(ids) / best['npy']:.0f} utt/s)  npy/store = {best['npy'] / best['store']:.2f}x")
        print(json.dumps(res))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
