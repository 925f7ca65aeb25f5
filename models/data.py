"""What a run trains and tests on: snapshot + split + feature store, checked against each
other, turned into utterances with CTC labels, and length-bucketed batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import text as T
from models.config import RunConfig
from models.errors import NkoOpsError
from models.model import Dims, ctc_min_frames, make_dims, output_lengths
from models.snapshot import Snapshot
from models.snapshot import load as load_snapshot
from models.split import PARTS, Split
from models.vocab import Vocab


class DataError(NkoOpsError, ValueError):
    pass


@dataclass
class Utterance:
    feat_id: str
    audio_id: str
    labels: list[int]
    reference_text: str
    nko: str
    latin: str
    frames: int
    out_frames: int

    @property
    def feasible(self) -> bool:
        return self.out_frames >= ctc_min_frames(self.labels)


@dataclass
class RunData:
    snapshot_path: Path
    snapshot_sha256: str
    split: Split
    split_path: Path
    store: object  # models.features.FeatureStore
    vocab: Vocab
    dims: Dims
    parts: dict[str, list[Utterance]]
    # train rows left out: {"unknown_chars": [{"feat_id", "chars"}], "empty": [feat_id, ...]}
    skipped: dict = field(default_factory=dict)
    # val/test rows kept although their reference has characters outside the vocabulary
    out_of_vocabulary: dict[str, list[dict]] = field(default_factory=dict)

    def infeasible(self) -> dict[str, int]:
        return {p: sum(not u.feasible for u in us) for p, us in self.parts.items()}


def _show(ids: list[str], n: int = 5) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


def char_labels(chars) -> list[str]:
    """``["'x' U+0078", ...]`` for a set of characters, sorted."""
    return [f"{c!r} U+{ord(c):04X}" for c in sorted(chars)]


def _show_oov(rows: list[dict], n: int = 5) -> str:
    shown = "; ".join(f"{r['feat_id']}: {', '.join(r['chars'])}" for r in rows[:n])
    return shown + (f"; and {len(rows) - n} more" if len(rows) > n else "")


def audio_id(row: dict) -> str:
    if row.get("audio_id"):
        return str(row["audio_id"])
    if row.get("audio"):
        return Path(row["audio"]).stem
    return row["feat_id"]


def check_store_source(store, snap: Snapshot, features: str) -> None:
    """The store must record ``snap`` among the snapshots it was extracted from
    (``nko-ops features extract`` records "<pairs.jsonl> sha256:<sha>")."""
    shas = [s.rsplit("sha256:", 1)[-1].strip() for s in store.sources]
    if snap.sha256 in shas:
        return
    found = f"records source(s) {_show(store.sources, 3)}" if store.sources else "records no source snapshot"
    raise DataError(f"features: the feature store {features} (config field 'features') {found}, not snapshot "
                    f"{snap.path} sha256:{snap.sha256}. Point 'features' at a store extracted from this snapshot "
                    f"(nko-ops features extract --snapshot {snap.root} --out DIR --whisper RECIPE); a store written "
                    f"with FeatureWriter must pass source=\"<pairs.jsonl> sha256:<sha>\"")


def prepare(cfg: RunConfig, split_path: str | Path | None = None, log=print) -> RunData:
    """Load and cross-check everything a run reads; DataError names what does not match.

    Every val and test utterance of the split is kept, so N'Ko and Latin runs of one split
    score the same test rows (CONTRACTS §5). A val/test reference with characters outside
    the vocabulary is scored as written (the model cannot emit them: they count as errors);
    its CTC labels, used only for the val loss and the feasibility count, are the reference
    with those characters removed. A val/test reference that is empty after the target
    normalisation is an error. Train rows with an empty or out-of-vocabulary target are
    skipped, logged with their characters and recorded in results.json."""
    snap = load_snapshot(Path(cfg.snapshot))
    if cfg.snapshot_sha256 and cfg.snapshot_sha256 != snap.sha256:
        raise DataError(f"snapshot_sha256 mismatch: config says {cfg.snapshot_sha256}, "
                        f"{snap.path} has {snap.sha256}")
    split_path = Path(split_path or cfg.split)
    split, by_id = _load_split(split_path, snap)
    store, vocab, dims = _open_features(cfg, snap)

    limits = {"train": cfg.subset.train, "val": cfg.subset.val, "test": cfg.subset.test}
    parts: dict[str, list[Utterance]] = {}
    skipped = {"unknown_chars": [], "empty": []}
    oov: dict[str, list[dict]] = {}
    for part in PARTS:
        ids = getattr(split, part)[: limits[part]] if limits[part] else getattr(split, part)
        utts, unknown, empty = _part_utterances(cfg, part, ids, by_id, store, vocab, dims, snap)
        if part == "train":
            skipped = {"unknown_chars": unknown, "empty": empty}
            if unknown:
                log(f"WARNING train: {len(unknown)} utterance(s) skipped, characters outside the {cfg.script} "
                    f"vocabulary: {_show_oov(unknown)}")
            if empty:
                log(f"WARNING train: {len(empty)} utterance(s) skipped, empty {cfg.script} target: {_show(empty)}")
        else:
            oov[part] = unknown
            if unknown:
                log(f"WARNING {part}: {len(unknown)} utterance(s) have characters outside the {cfg.script} "
                    f"vocabulary; they are kept and scored as written (those characters count as errors): "
                    f"{_show_oov(unknown)}")
        parts[part] = utts
    data = RunData(snap.path, snap.sha256, split, split_path, store, vocab, dims, parts, skipped, oov)
    _check_usable(data, log)
    return data


def _load_split(split_path: Path, snap: Snapshot) -> tuple[Split, dict]:
    """The split file, made for ``snap``, every feat_id of it in the snapshot; and the rows by id."""
    if not split_path.exists():
        raise DataError(f"split file not found: {split_path} (config field 'split')")
    split = Split.load(split_path)
    if split.snapshot_sha256 and split.snapshot_sha256 != snap.sha256:
        raise DataError(f"split/snapshot mismatch: {split_path} was made for snapshot {split.snapshot_sha256[:12]}, "
                        f"but {snap.path} is {snap.sha256[:12]}")
    by_id = snap.by_id()
    for part in PARTS:
        missing = [f for f in getattr(split, part) if f not in by_id]
        if missing:
            raise DataError(f"split/snapshot mismatch: {len(missing)} {part} feat_id(s) of {split_path} are not in "
                            f"{snap.path}: {_show(missing)}")
    return split, by_id


def _open_features(cfg: RunConfig, snap: Snapshot):
    """The feature store (extracted from ``snap``), the script's vocabulary and the model dims."""
    from models.features import FeatureStore

    try:
        store = FeatureStore.open(Path(cfg.features))
    except FileNotFoundError as e:
        raise DataError(f"features: {e}") from None
    check_store_source(store, snap, cfg.features)
    overrides = cfg.model.overrides()
    if "n_input" in overrides and overrides["n_input"] != store.dim:
        raise DataError(f"model.n_input={overrides['n_input']} but the feature store {cfg.features} has dim {store.dim}")
    vocab = Vocab.for_script(cfg.script)
    overrides.update(n_input=store.dim, n_vocab=len(vocab))
    try:
        dims = make_dims(cfg.model.preset, **overrides)
    except ValueError as e:
        raise DataError(str(e)) from None
    return store, vocab, dims


def _part_utterances(cfg: RunConfig, part: str, ids: list[str], by_id: dict, store, vocab: Vocab, dims: Dims,
                     snap: Snapshot) -> tuple[list[Utterance], list[dict], list[str]]:
    """One split part's utterances, its out-of-vocabulary rows ({"feat_id", "chars"}) and its
    rows with an empty target (an error outside train; train drops both kinds)."""
    absent = [f for f in ids if f not in store]
    if absent:
        raise DataError(f"features: {len(absent)} {part} feat_id(s) are not in the feature store "
                        f"{cfg.features}: {_show(absent)}")
    refs = {f: T.target_text(by_id[f][cfg.script], cfg.script) for f in ids}
    empty = [f for f in ids if not refs[f]]
    if empty and part != "train":
        raise DataError(f"{part} utterance(s) with an empty {cfg.script} target after normalisation (punctuation "
                        f"removed) cannot be scored: {_show(empty)} (field '{cfg.script}' of {snap.path}: "
                        f"{by_id[empty[0]][cfg.script]!r}); fix these snapshot rows or drop them from the split")
    frames = [store.frames(f) for f in ids]
    outs = output_lengths(torch.tensor(frames, dtype=torch.long), dims).tolist() if ids else []
    utts, unknown = [], []
    for fid, n, n_out in zip(ids, frames, outs):
        row, ref = by_id[fid], refs[fid]
        if not ref:
            continue
        bad = vocab.unknown([ref])
        if bad:
            unknown.append({"feat_id": fid, "chars": char_labels(bad)})
            if part == "train":
                continue
        known = " ".join("".join(ch for ch in ref if ch not in bad).split()) if bad else ref
        utts.append(Utterance(fid, audio_id(row), vocab.encode(known), ref, row["nko"], row["latin"], n, n_out))
    return utts, unknown, empty


def _check_usable(data: RunData, log) -> None:
    """Warn about CTC-infeasible utterances; refuse a split part left with none usable."""
    for part, n in data.infeasible().items():
        if n:
            log(f"WARNING {part}: {n} of {len(data.parts[part])} utterance(s) are CTC-infeasible (fewer encoder "
                f"frames than labels + repeats at conv stride {data.dims.conv_stride}); "
                + ("they are left out of the loss" if part != "test" else "they are still decoded and scored"))
    for part in ("train", "val", "test"):
        usable = [u for u in data.parts[part] if u.feasible or part == "test"]
        if not usable:
            raise DataError(f"split part '{part}' has no usable utterances (after subset, vocabulary and CTC checks)")


def make_batches(utts: list[Utterance], batch_size: int, max_batch_frames: int | None = None) -> list[list[int]]:
    """Indices into ``utts`` sorted by length (ties by feat_id) and cut into batches of at most
    ``batch_size`` utterances and, if set, ``max_batch_frames`` padded frames."""
    order = sorted(range(len(utts)), key=lambda i: (utts[i].frames, utts[i].feat_id))
    batches, cur = [], []
    for i in order:
        longest = utts[i].frames  # sorted ascending: the newcomer is the longest
        if cur and (len(cur) == batch_size or (max_batch_frames and longest * (len(cur) + 1) > max_batch_frames)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def padding_waste(utts: list[Utterance], batches: list[list[int]]) -> float:
    """Fraction of padded frames in ``batches``: 1 − real frames / (batch size × longest)."""
    real = sum(utts[i].frames for b in batches for i in b)
    padded = sum(len(b) * max(utts[i].frames for i in b) for b in batches)
    return 1 - real / padded if padded else 0.0


def collate(store, utts: list[Utterance], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features [B, T, F] float32, lengths [B], concatenated labels, label lengths)."""
    arrays = [store.get(utts[i].feat_id) for i in idx]
    T_max = max(a.shape[0] for a in arrays)
    x = np.zeros((len(arrays), T_max, arrays[0].shape[1]), dtype=np.float32)
    for j, a in enumerate(arrays):
        x[j, : a.shape[0]] = a
    lengths = torch.tensor([a.shape[0] for a in arrays], dtype=torch.long)
    labels = torch.tensor([t for i in idx for t in utts[i].labels], dtype=torch.long)
    label_lengths = torch.tensor([len(utts[i].labels) for i in idx], dtype=torch.long)
    return torch.from_numpy(x), lengths, labels, label_lengths


def spec_augment(x: torch.Tensor, lengths: torch.Tensor, cfg, generator: torch.Generator) -> torch.Tensor:
    """Zero ``freq_masks`` channel bands and ``time_masks`` frame spans per utterance; mask
    positions come from ``generator`` (CPU) so they are part of the resumable state."""
    if not cfg.enabled:
        return x
    B, _, F_ = x.shape
    x = x.clone()
    for b in range(B):
        n = int(lengths[b])
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_width + 1, (1,), generator=generator))
            f0 = int(torch.randint(0, max(1, F_ - w + 1), (1,), generator=generator))
            x[b, :n, f0:f0 + w] = 0
        t_cap = min(cfg.time_width, int(cfg.time_max_fraction * n))
        for _ in range(cfg.time_masks):
            w = int(torch.randint(0, t_cap + 1, (1,), generator=generator))
            t0 = int(torch.randint(0, max(1, n - w + 1), (1,), generator=generator))
            x[b, t0:t0 + w] = 0
    return x
