"""``nko-ops features import``: features computed elsewhere -> the sharded feature store.

The program already holds Whisper-large-v3 encoder states for its corpus (1500 frames per
30 s window, pooled to 375). This brings such a cache in without re-extracting: a directory
of per-utterance arrays named ``<feat_id>.npy`` or ``<feat_id>.pt`` (a tensor, or a dict
holding one; ``key`` picks the entry when the dict has several), searched recursively.

Checked before anything is written: every file's feat_id is in the snapshot (else the
import is refused, naming the ids), no feat_id appears twice, every array is 2-D
``[frames, dim]`` (a leading batch axis of 1 is dropped) of a float dtype, all share one
``dim`` (and ``frames`` when given), and none holds NaN/inf or a value beyond float16's range.
Then the arrays are written as float16 into the store with an ``imported`` recipe that
records what the user declares (model, pooling, frame rate) and the source's sha256: the
sha256 of the sorted ``"<feat_id> <sha256 of the file>"`` lines, so it names the exact bytes
imported wherever the directory lives. A failed import leaves no store behind (or an
existing one as it was); a re-run with the same source resumes, skipping stored ids.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from models.errors import FeatureError
from models.features import FeatureWriter, check_same_snapshot, recipe_hash

IMPORT_SUFFIXES = (".npy", ".pt")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def find_arrays(src: Path) -> dict[str, Path]:
    """feat_id -> file for every ``*.npy`` / ``*.pt`` under ``src``; a feat_id found twice is an error."""
    if not src.is_dir():
        raise FeatureError(f"{src}: not a directory of per-utterance arrays")
    found: dict[str, Path] = {}
    for path in sorted(p for p in src.rglob("*") if p.suffix in IMPORT_SUFFIXES and p.is_file()):
        fid = path.stem
        if fid in found:
            raise FeatureError(f"feat_id {fid} appears twice: {found[fid]} and {path}")
        found[fid] = path
    if not found:
        raise FeatureError(f"{src}: no .npy or .pt files")
    return found


def read_array(path: Path, data: bytes, key: str | None = None) -> np.ndarray:
    """The ``[frames, dim]`` float32 array in one file's bytes; errors name the file."""
    if path.suffix == ".npy":
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise FeatureError(f"{path}: not a plain .npy array ({e})") from None
        what = "array"
    else:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many kinds for a file that is not a tensor file
            raise FeatureError(f"{path}: not a readable torch file ({type(e).__name__})") from None
        what = "tensor"
        if isinstance(obj, dict):
            named = obj.get("feat_id")
            if isinstance(named, str) and named != path.stem:
                raise FeatureError(f"{path}: its feat_id entry says {named!r}, the file name says {path.stem!r}")
            if key is not None:
                if key not in obj:
                    raise FeatureError(f"{path}: no key {key!r} (keys: {', '.join(map(str, obj))})")
                obj, what = obj[key], f"entry {key!r}"
            else:
                tensors = [k for k, v in obj.items() if isinstance(v, (torch.Tensor, np.ndarray))]
                if len(tensors) != 1:
                    raise FeatureError(f"{path}: a dict with {len(tensors)} tensors ({', '.join(map(str, tensors))}); "
                                       f"say which with --key")
                obj, what = obj[tensors[0]], f"entry {tensors[0]!r}"
        if isinstance(obj, torch.Tensor):
            if not obj.is_floating_point():
                raise FeatureError(f"{path}: {what} has dtype {obj.dtype}, not a float type")
            a = obj.detach().float().numpy()
        elif isinstance(obj, np.ndarray):
            a = obj
        else:
            raise FeatureError(f"{path}: holds a {type(obj).__name__}, not a tensor")
    if a.dtype.kind != "f":
        raise FeatureError(f"{path}: {what} has dtype {a.dtype}, not a float type")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise FeatureError(f"{path}: {what} has shape {list(a.shape)}, expected [frames, dim]")
    a = a.astype(np.float32, copy=False)
    bad = ~np.isfinite(a)
    if bad.any():
        t, d = map(int, np.argwhere(bad)[0])
        raise FeatureError(f"{path}: {int(bad.sum())} NaN/inf value(s), first at frame {t}, dim {d}")
    peak = float(np.abs(a).max())
    if peak > FLOAT16_MAX:
        raise FeatureError(f"{path}: value {peak:g} does not fit float16 (max {FLOAT16_MAX:g})")
    return a


def make_import_recipe(dim: int, source_sha256: str, source_files: int, pooling: str, frame_rate: float | None,
                       model: str, source_name: str) -> dict:
    recipe = {"recipe_version": 1, "name": "imported", "model": model, "pool": pooling, "dim": int(dim),
              "dtype": "float16", "frame_rate": frame_rate, "source": source_name,
              "source_sha256": source_sha256, "source_files": int(source_files)}
    recipe["hash"] = recipe_hash(recipe)
    return recipe


def import_features(src: str | Path, snapshot_dir: str | Path, out_dir: str | Path, pooling: str,
                    model: str, frame_rate: float | None = None, key: str | None = None,
                    frames: int | None = None, dim: int | None = None, allow_missing: bool = False) -> dict:
    """Check every array under ``src`` against the snapshot, then write them into the store
    ``out_dir``. Returns a summary dict."""
    from models.snapshot import load

    src, out_dir = Path(src), Path(out_dir)
    if not pooling.strip():
        raise FeatureError("say how the imported frames were pooled (e.g. 'mean 4: 1500 -> 375')")
    snap = load(snapshot_dir)
    files = find_arrays(src)
    known = set(snap.feat_ids)
    foreign = [fid for fid in files if fid not in known]
    if foreign:
        raise FeatureError(f"{len(foreign)} file(s) under {src} are not rows of {snap.path}: "
                           f"{', '.join(str(files[f].relative_to(src)) for f in foreign[:5])}"
                           + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""))
    missing = [fid for fid in snap.feat_ids if fid not in files]
    if missing and not allow_missing:
        raise FeatureError(f"{len(missing)} row(s) of {snap.path} have no array under {src} (e.g. {missing[0]}); "
                           f"pass --allow-missing to import a partial store")
    t0 = time.perf_counter()
    # Pass 1: read and check every file; nothing is written until all pass.
    digests: dict[str, str] = {}
    frame_counts: list[int] = []
    declared = dim is not None
    for fid, path in files.items():
        data = path.read_bytes()
        a = read_array(path, data, key)
        if dim is None:
            dim = a.shape[1]
        if a.shape[1] != dim:
            raise FeatureError(f"{path}: dim {a.shape[1]}, " + (f"expected {dim}" if declared else
                                                                 f"the other arrays have {dim}"))
        if frames is not None and a.shape[0] != frames:
            raise FeatureError(f"{path}: {a.shape[0]} frames, expected {frames}")
        digests[fid] = hashlib.sha256(data).hexdigest()
        frame_counts.append(a.shape[0])
    listing = "".join(f"{fid} {digests[fid]}\n" for fid in sorted(digests))
    source_sha = hashlib.sha256(listing.encode("utf-8")).hexdigest()
    recipe = make_import_recipe(dim, source_sha, len(files), pooling, frame_rate, model, src.resolve().name)
    source = f"{snap.path} sha256:{snap.sha256}"
    check_same_snapshot(out_dir, source, list(files))
    existed = out_dir.exists()
    try:
        with FeatureWriter(out_dir, recipe, source=source) as w:
            added = 0
            for fid, path in files.items():
                if fid in w:
                    continue
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != digests[fid]:
                    raise FeatureError(f"{path}: changed while it was being imported")
                w.add(fid, read_array(path, data, key))
                added += 1
    except BaseException:
        if not existed:  # the writer keeps complete shards for a resume; a new store goes entirely
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    return {"store": str(out_dir), "recipe": "imported", "recipe_hash": recipe["hash"], "source": str(src),
            "source_sha256": source_sha, "files": len(files), "added": added, "skipped": len(files) - added,
            "missing": len(missing), "dim": dim, "frames_min": min(frame_counts), "frames_max": max(frame_counts),
            "pool": pooling, "frame_rate": frame_rate, "seconds": round(seconds, 3)}
