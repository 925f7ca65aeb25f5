"""``nko-ops features import`` (models/feature_import.py) on arrays written by the test."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.feature_import import import_features
from models.errors import FeatureError
from models.features import FeatureStore

IDS = ["bam_a", "bam_b", "bam_c", "bam_d"]
POOL = "mean 4: 1500 -> 375 (padded 30 s window)"
MODEL = "openai-whisper large-v3 encoder (test arrays)"


def write_snapshot(root: Path, ids: list[str] = IDS) -> Path:
    root.mkdir(parents=True)
    rows = [{"feat_id": f, "nko": "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "latin": "i ye san joli ye"} for f in ids]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                      encoding="utf-8")
    return root


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """A snapshot and a cache in the shapes people have: .npy [frames, dim], a .pt tensor with
    a batch axis in float16, a .pt dict with the tensor and metadata, in a subfolder."""
    snap = write_snapshot(tmp_path / "snap")
    src = tmp_path / "cache"
    (src / "part2").mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {fid: rng.standard_normal((n, 16)).astype(np.float32) for fid, n in zip(IDS, (375, 375, 120, 375))}
    np.save(src / "bam_a.npy", arrays["bam_a"])
    torch.save(torch.from_numpy(arrays["bam_b"]).half()[None], src / "bam_b.pt")
    arrays["bam_b"] = arrays["bam_b"].astype(np.float16).astype(np.float32)
    torch.save({"feat_id": "bam_c", "features": torch.from_numpy(arrays["bam_c"]), "n_frames": 120},
               src / "part2" / "bam_c.pt")
    np.save(src / "part2" / "bam_d.npy", arrays["bam_d"].astype(np.float64))
    return snap, src, arrays


def expected_source_sha(src: Path) -> str:
    lines = sorted(f"{p.stem} {hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                   for p in src.rglob("*") if p.suffix in (".npy", ".pt"))
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_import_writes_the_store_with_an_imported_recipe(cache, tmp_path: Path) -> None:
    snap, src, arrays = cache
    out = tmp_path / "feats"
    summary = import_features(src, snap, out, pooling=POOL, model=MODEL, frame_rate=12.5)
    assert (summary["files"], summary["added"], summary["dim"]) == (4, 4, 16)
    store = FeatureStore.open(out)
    assert sorted(store.ids) == IDS and store.dim == 16
    for fid, a in arrays.items():
        np.testing.assert_array_equal(store.get(fid), a.astype(np.float16))
    r = store.recipe
    assert r["name"] == "imported" and r["pool"] == POOL and r["model"] == MODEL and r["frame_rate"] == 12.5
    assert r["source_sha256"] == expected_source_sha(src) == summary["source_sha256"]
    assert r["source_files"] == 4 and r["dtype"] == "float16"
    snap_sha = hashlib.sha256((snap / "pairs.jsonl").read_bytes()).hexdigest()
    assert store.sources == [f"{snap / 'pairs.jsonl'} sha256:{snap_sha}"]
    again = import_features(src, snap, out, pooling=POOL, model=MODEL, frame_rate=12.5)
    assert (again["added"], again["skipped"]) == (0, 4)
    np.save(src / "bam_a.npy", arrays["bam_a"] + 1)  # another source: not mixed into this store
    with pytest.raises(FeatureError, match="differs in: source_sha256"):
        import_features(src, snap, out, pooling=POOL, model=MODEL, frame_rate=12.5)


@pytest.mark.parametrize("case, writer, message", [
    ("foreign id", lambda src: np.save(src / "bam_zz.npy", np.ones((5, 16), np.float32)),
     r"1 file\(s\) under .* are not rows of .*pairs.jsonl: bam_zz.npy"),
    ("nan", lambda src: np.save(src / "bam_a.npy", np.full((5, 16), np.nan, np.float32)),
     r"bam_a.npy: 80 NaN/inf value\(s\), first at frame 0, dim 0"),
    ("inf in a tensor", lambda src: torch.save(torch.tensor([[1.0] * 15 + [float("inf")]]), src / "bam_a.pt"),
     r"bam_a.pt: 1 NaN/inf value\(s\), first at frame 0, dim 15"),
    ("float16 overflow", lambda src: np.save(src / "bam_a.npy", np.full((5, 16), 1e6, np.float32)),
     r"bam_a.npy: value 1e\+06 does not fit float16"),
    ("dim", lambda src: np.save(src / "part2" / "bam_d.npy", np.ones((375, 12), np.float32)),
     r"bam_d.npy: dim 12, the other arrays have 16"),
    ("1-d", lambda src: np.save(src / "bam_a.npy", np.ones(16, np.float32)),
     r"bam_a.npy: array has shape \[16\], expected \[frames, dim\]"),
    ("int dtype", lambda src: np.save(src / "bam_a.npy", np.ones((5, 16), np.int16)),
     r"bam_a.npy: array has dtype int16, not a float type"),
    ("int tensor", lambda src: torch.save(torch.ones(5, 16, dtype=torch.int64), src / "bam_a.pt"),
     r"bam_a.pt: tensor has dtype torch.int64"),
    ("duplicate", lambda src: np.save(src / "part2" / "bam_b.npy", np.ones((5, 16), np.float32)),
     r"feat_id bam_b appears twice"),
    ("two tensors", lambda src: torch.save({"a": torch.ones(5, 16), "b": torch.ones(5, 16)}, src / "bam_a.pt"),
     r"bam_a.pt: a dict with 2 tensors \(a, b\); say which with --key"),
    ("wrong feat_id inside", lambda src: torch.save({"feat_id": "bam_x", "f": torch.ones(5, 16)}, src / "bam_a.pt"),
     r"bam_a.pt: its feat_id entry says 'bam_x'"),
    ("not a file of arrays", lambda src: (src / "bam_a.npy").write_bytes(b"hello"), r"bam_a.npy: not a plain .npy"),
])
def test_bad_input_names_the_file_and_writes_nothing(cache, tmp_path: Path, case: str, writer, message: str) -> None:
    snap, src, _ = cache
    if case in ("nan", "float16 overflow", "1-d", "int dtype", "not a file of arrays"):
        (src / "bam_a.npy").unlink()
    if case in ("inf in a tensor", "int tensor", "two tensors", "wrong feat_id inside"):
        (src / "bam_a.npy").unlink()
    writer(src)
    out = tmp_path / "feats"
    with pytest.raises(FeatureError, match=message):
        import_features(src, snap, out, pooling=POOL, model=MODEL)
    assert not out.exists()


def test_missing_rows_need_allow_missing_and_frames_can_be_required(cache, tmp_path: Path) -> None:
    snap, src, _ = cache
    (src / "part2" / "bam_d.npy").unlink()
    with pytest.raises(FeatureError, match=r"1 row\(s\) of .* have no array .*bam_d.*--allow-missing"):
        import_features(src, snap, tmp_path / "f", pooling=POOL, model=MODEL)
    with pytest.raises(FeatureError, match=r"bam_c.pt: 120 frames, expected 375"):
        import_features(src, snap, tmp_path / "f", pooling=POOL, model=MODEL, frames=375, allow_missing=True)
    summary = import_features(src, snap, tmp_path / "f", pooling=POOL, model=MODEL, allow_missing=True)
    assert summary["missing"] == 1 and sorted(FeatureStore.open(tmp_path / "f").ids) == ["bam_a", "bam_b", "bam_c"]


def test_cli_import_and_describe(cache, tmp_path: Path) -> None:
    from cli.root import app

    snap, src, _ = cache
    runner = CliRunner()
    out = tmp_path / "feats"
    res = runner.invoke(app, ["features", "import", str(src), "--snapshot", str(snap), "--out", str(out),
                              "--pool", POOL, "--model", MODEL, "--frame-rate", "12.5", "--dim", "16"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["added"] == 4
    res = runner.invoke(app, ["features", "describe", str(out)])
    assert res.exit_code == 0 and "imported" in res.output and expected_source_sha(src) in res.output
    res = runner.invoke(app, ["features", "import", str(src), "--snapshot", str(snap), "--out", str(tmp_path / "g"),
                              "--pool", POOL, "--model", MODEL, "--dim", "1280"])
    assert res.exit_code == 2 and "dim 16" in res.output and not (tmp_path / "g").exists()


def test_a_run_trains_on_an_imported_store(tmp_path: Path) -> None:
    """Features exported as .npy / .pt per feat_id, imported, and trained on: the trainer
    accepts the store (snapshot recorded) and the run completes with the imported recipe."""
    import train_helpers as H
    from models.config import parse_config
    from models.train import train

    cfg = H.build(tmp_path / "orig", n=30)
    original = FeatureStore.open(cfg["features"])
    src = tmp_path / "cache"
    src.mkdir()
    for i, fid in enumerate(original.ids):
        a = original.get(fid).astype(np.float32)
        if i % 2:
            np.save(src / f"{fid}.npy", a)
        else:
            torch.save({"features": torch.from_numpy(a)}, src / f"{fid}.pt")
    summary = import_features(src, cfg["snapshot"], tmp_path / "imported", pooling="none (test prototypes)",
                              model="synthetic prototypes", frame_rate=50.0)
    assert summary["added"] == 30
    cfg.update(features=str(tmp_path / "imported"), out_dir=str(tmp_path / "runs" / "imp"), run_id="imp")
    cfg["train"]["epochs"] = 2
    run_dir = train(parse_config(cfg), echo=False)
    result = json.loads((Path(run_dir) / "results.json").read_text(encoding="utf-8"))
    assert result["status"] == "complete" and result["feature_recipe"] == "imported"
    assert (Path(run_dir) / "manifest.json").is_file()
    assert result["feature_recipe_hash"] == FeatureStore.open(tmp_path / "imported").recipe_hash
