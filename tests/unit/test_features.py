"""Feature store, recipes, encoders and audio loading (models/features.py, models/audio.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from models.audio import AudioError, load_audio, resample
from models.errors import FeatureError
from models.features import (FeatureStore, FeatureWriter, content_frames, extract, featurize,
                             load_encoder, make_recipe, recipe_hash)
from models.snapshot import SnapshotError

SR = 16000


def tone(seconds: float, freq: float = 440.0, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_snapshot(root: Path, specs: list[tuple[str, float, int]], fmt: str = "OGG") -> Path:
    """A snapshot dir with one tone clip per (feat_id, seconds, sample_rate)."""
    (root / "audio").mkdir(parents=True)
    rows = []
    for i, (fid, seconds, sr) in enumerate(specs):
        wave = tone(seconds, 300.0 + 50 * i, sr)
        ext, sub = (".ogg", "VORBIS") if fmt == "OGG" else (".wav", "PCM_16")
        sf.write(root / "audio" / f"{fid}{ext}", wave, sr, format=fmt, subtype=sub)
        rows.append({"feat_id": fid, "nko": "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "latin": "i ye san joli ye"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    return make_snapshot(tmp_path / "snap", [("bam_a", 1.2, SR), ("bam_b", 2.5, SR), ("bam_c", 0.7, 22050),
                                             ("bam_d", 3.1, SR)])


def small_recipe(dim: int = 8) -> dict:
    recipe = make_recipe("log-mel")
    recipe.update(dim=dim)
    recipe["hash"] = recipe_hash(recipe)
    return recipe


# ---------------------------------------------------------------- store


def test_store_round_trip_across_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"id{i}": rng.standard_normal((int(rng.integers(1, 40)), 8)).astype(np.float32) for i in range(25)}
    recipe = small_recipe()
    with FeatureWriter(tmp_path / "store", recipe, shard_bytes=1000) as w:
        for fid, a in arrays.items():
            assert w.add(fid, a)
    store = FeatureStore.open(tmp_path / "store")
    assert store.ids == list(arrays)
    assert store.dim == 8 and store.recipe == recipe and store.recipe_hash == recipe["hash"]
    assert len(store.shards) > 2  # the small shard_bytes forced several shards
    for fid, a in arrays.items():
        got = store.get(fid)
        assert got.dtype == np.float16 and got.shape == a.shape and store.frames(fid) == a.shape[0]
        np.testing.assert_array_equal(got, a.astype(np.float16))
    info = store.describe()
    assert info["utterances"] == 25 and info["frames_total"] == sum(a.shape[0] for a in arrays.values())
    assert sorted(p.name for p in (tmp_path / "store").iterdir() if p.name.endswith(".tmp")) == []
    with pytest.raises(KeyError, match="nope"):
        store.get("nope")


def test_open_missing_store_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        FeatureStore.open(tmp_path / "absent")


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureWriter(root, small_recipe()) as w:
            w.add("a", np.ones((5, 8)))
            w.add("b", np.ones((3, 8)))
            raise RuntimeError("boom")
    assert not root.exists()
    with pytest.raises(FileNotFoundError):
        FeatureStore.open(root)


def test_crash_keeps_only_complete_shards_and_resume_finishes(tmp_path: Path) -> None:
    root, recipe = tmp_path / "store", small_recipe()
    data = {f"u{i}": np.full((10, 8), i, dtype=np.float32) for i in range(12)}
    with pytest.raises(RuntimeError):
        with FeatureWriter(root, recipe, shard_bytes=10 * 8 * 2 * 4) as w:  # a shard per 4 clips
            for i, (fid, a) in enumerate(data.items()):
                if i == 6:
                    raise RuntimeError("killed mid-shard")
                w.add(fid, a)
    store = FeatureStore.open(root)
    assert store.ids == ["u0", "u1", "u2", "u3"]  # u4, u5 were in the unfinished shard
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    with FeatureWriter(root, recipe, shard_bytes=10 * 8 * 2 * 4) as w:
        added = [fid for fid, a in data.items() if w.add(fid, a)]
    assert added == [f"u{i}" for i in range(4, 12)]
    store = FeatureStore.open(root)
    assert store.ids == list(data)
    assert all(float(store.get(fid)[0, 0]) == i for i, fid in enumerate(data))


def test_writer_rejects_bad_arrays_and_other_recipes(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with FeatureWriter(root, small_recipe()) as w:
        with pytest.raises(FeatureError, match="bam_x"):
            w.add("bam_x", np.ones((4, 7)))
        with pytest.raises(FeatureError, match="bam_y"):
            w.add("bam_y", np.full((4, 8), 1e6))  # overflows float16
        w.add("ok", np.ones((4, 8)))
    with pytest.raises(FeatureError, match="differs in: dim"):
        with FeatureWriter(root, small_recipe(dim=16)):
            pass
    forged = dict(small_recipe(), dim=16)
    with pytest.raises(FeatureError, match="hash"):
        FeatureWriter(root, forged)


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path / "s", small_recipe()) as w:
        w.add("a", np.ones((2, 8)))
        with pytest.raises(FeatureError, match="another writer"):
            with FeatureWriter(tmp_path / "s", small_recipe()):
                pass
    assert FeatureStore.open(tmp_path / "s").ids == ["a"]


# ---------------------------------------------------------------- recipes


def test_recipe_hash_stable_and_distinct() -> None:
    a = make_recipe("tiny-random")
    assert a == make_recipe("tiny-random", mode="padded", subsample=4)
    body = json.dumps({k: v for k, v in a.items() if k != "hash"}, sort_keys=True, separators=(",", ":"))
    assert a["hash"] == hashlib.sha256(body.encode()).hexdigest()
    for key in ("name", "hash", "dim", "frame_rate"):
        assert key in a
    variants = [make_recipe(n, mode=m) for n in ("large-v3", "tiny-random", "log-mel") for m in ("padded", "trimmed")]
    variants += [make_recipe("tiny-random", subsample=2), make_recipe("tiny-random", compute_dtype="float16"),
                 make_recipe("tiny-random", seed=1)]
    assert len({r["hash"] for r in variants}) == len(variants)
    v3 = make_recipe("large-v3")
    assert v3["dim"] == 1280 and v3["n_mels"] == 128 and v3["frame_rate"] == 12.5
    assert make_recipe("log-mel")["n_mels"] == 80
    with pytest.raises(FeatureError, match="unknown recipe"):
        make_recipe("large-v2")


# ---------------------------------------------------------------- encoders


def test_tiny_random_padded_and_trimmed_shapes() -> None:
    waves = [tone(1.0), tone(2.53, 600.0), tone(0.31, 900.0)]
    ids = ["a", "b", "c"]
    for mode in ("padded", "trimmed"):
        recipe = make_recipe("tiny-random", mode=mode)
        feats = featurize(recipe, waves, ids, load_encoder(recipe), batch_size=2)
        for f, w in zip(feats, waves):
            assert f.dtype == np.float16 and f.shape == (content_frames(len(w), recipe), 64)
            assert np.isfinite(f).all()
        if mode == "padded":
            assert {f.shape[0] for f in feats} == {375}
        else:  # 50 encoder frames/s, mean-pooled by 4, ceil
            assert [f.shape[0] for f in feats] == [13, 32, 4]


def test_trimmed_equals_padded_when_the_clip_fills_the_window() -> None:
    # 29.6 s -> 2960 mel frames -> 1480 encoder frames -> 370 pooled frames, all complete
    # groups. The trimmed input is the padded window's first 3000 frames (the bucket caps
    # at the window), so the sliced-embedding path must reproduce the stock forward.
    # Shorter clips differ: the padded encoder attends over the silent rest of the window.
    wave = tone(29.6, 500.0) * np.linspace(0.2, 1.0, int(29.6 * SR), dtype=np.float32)
    out = {}
    for mode in ("padded", "trimmed"):
        recipe = make_recipe("tiny-random", mode=mode)
        out[mode] = featurize(recipe, [wave], ["long"], load_encoder(recipe))[0].astype(np.float32)
    assert out["trimmed"].shape == (370, 64)
    np.testing.assert_allclose(out["trimmed"], out["padded"][:370], atol=2e-3)
    short = {}
    for mode in ("padded", "trimmed"):
        recipe = make_recipe("tiny-random", mode=mode)
        short[mode] = featurize(recipe, [wave[:SR]], ["short"], load_encoder(recipe))[0].astype(np.float32)
    assert not np.allclose(short["trimmed"], short["padded"][:13], atol=2e-3)


def test_trimmed_features_do_not_depend_on_the_batch() -> None:
    recipe = make_recipe("tiny-random", mode="trimmed")
    enc = load_encoder(recipe)
    waves = [tone(1.0, 300.0), tone(1.3, 700.0), tone(0.9, 1100.0)]  # one 160-frame bucket
    alone = featurize(recipe, waves[:1], ["a"], enc)[0]
    together = featurize(recipe, waves, ["a", "b", "c"], enc, batch_size=3)[0]
    np.testing.assert_allclose(alone.astype(np.float32), together.astype(np.float32), atol=2e-3)


def test_log_mel_recipe_frames() -> None:
    recipe = make_recipe("log-mel")
    f = featurize(recipe, [tone(1.0)], ["a"])[0]
    assert f.shape == (25, 80) and recipe["frame_rate"] == 25.0


def test_missing_large_v3_weights_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "w" / "large-v3.pt")):
        load_encoder(make_recipe("large-v3"), weights_dir=tmp_path / "w")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cache" / "whisper" / "large-v3.pt")):
        load_encoder(make_recipe("large-v3"))


def test_clip_longer_than_window_names_feat_id() -> None:
    recipe = make_recipe("tiny-random", mode="trimmed")
    with pytest.raises(FeatureError, match="bam_long.*30 s"):
        featurize(recipe, [np.zeros(31 * SR, np.float32)], ["bam_long"], load_encoder(recipe))


# ---------------------------------------------------------------- extract


def test_extract_builds_and_resumes(snapshot: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    first = extract(snapshot, out, "tiny-random", mode="trimmed", device="cpu", limit=2, progress=False)
    assert (first["added"], first["skipped"]) == (2, 0)
    second = extract(snapshot, out, "tiny-random", mode="trimmed", device="cpu", progress=False)
    assert (second["added"], second["skipped"]) == (2, 2)
    store = FeatureStore.open(out)
    assert store.ids == ["bam_a", "bam_b", "bam_c", "bam_d"]
    assert store.frames("bam_c") == content_frames(int(0.7 * SR), store.recipe)  # 22.05 kHz file, resampled
    assert store.recipe["compute_dtype"] == "float32" and len(store.sources) == 1
    third = extract(snapshot, out, "tiny-random", mode="trimmed", device="cpu", progress=False)
    assert (third["added"], third["skipped"]) == (0, 4)
    with pytest.raises(FeatureError, match="differs in: .*mode"):
        extract(snapshot, out, "tiny-random", mode="padded", device="cpu", progress=False)


def test_extract_refuses_a_store_built_from_another_snapshot(snapshot: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "feats"
    extract(snapshot, out, "log-mel", progress=False)
    moved = tmp_path / "elsewhere"
    shutil.copytree(snapshot, moved)  # the same snapshot at another path: its features are still right
    assert extract(moved, out, "log-mel", progress=False)["added"] == 0
    lines = (moved / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[0])
    row["latin"] = "i ye san saba ye"  # a changed corpus, the same feat_ids
    (moved / "pairs.jsonl").write_text("\n".join([json.dumps(row, ensure_ascii=False), *lines[1:]]) + "\n",
                                       encoding="utf-8")
    before = (out / "index.json").read_bytes()
    with pytest.raises(FeatureError, match=r"was extracted from .*sha256:.*4 feat_id\(s\) are in both.*new --out"):
        extract(moved, out, "log-mel", progress=False)
    assert (out / "index.json").read_bytes() == before


def test_extract_missing_audio_names_feat_id(snapshot: Path, tmp_path: Path) -> None:
    (snapshot / "audio" / "bam_b.ogg").unlink()
    with pytest.raises(FeatureError, match="bam_b: audio file missing"):
        extract(snapshot, tmp_path / "f", "log-mel", progress=False)
    assert not (tmp_path / "f").exists()


def test_extract_unreadable_audio_names_feat_id(snapshot: Path, tmp_path: Path) -> None:
    (snapshot / "audio" / "bam_c.ogg").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="bam_c: cannot read audio"):
        extract(snapshot, tmp_path / "f", "log-mel", progress=False)


def test_extract_empty_transcript_names_feat_id(snapshot: Path, tmp_path: Path) -> None:
    lines = (snapshot / "pairs.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[2])
    row["nko"] = ""
    lines[2] = json.dumps(row, ensure_ascii=False)
    (snapshot / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SnapshotError, match=r"bam_c\): field 'nko' is empty"):
        extract(snapshot, tmp_path / "f", "log-mel", progress=False)


def test_cli_extract_and_describe(snapshot: Path, tmp_path: Path) -> None:
    from cli.root import app

    runner = CliRunner()
    out = tmp_path / "feats"
    res = runner.invoke(app, ["features", "extract", "--snapshot", str(snapshot), "--out", str(out),
                              "--whisper", "log-mel", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["added"] == 4
    res = runner.invoke(app, ["features", "describe", str(out), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["utterances"] == 4
    res = runner.invoke(app, ["features", "extract", "--snapshot", str(snapshot), "--out", str(tmp_path / "v3"),
                              "--whisper", "large-v3", "--weights-dir", str(tmp_path / "nowhere"), "--no-progress"])
    assert res.exit_code == 2 and "large-v3.pt" in res.output


# ---------------------------------------------------------------- audio


def test_resample_keeps_duration_and_frequency() -> None:
    wave = tone(2.0, 1000.0, sr=22050)
    out = resample(wave, 22050, 16000)
    assert len(out) == 32000
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 1000.0) <= 0.5
    ref = tone(2.0, 1000.0)
    np.testing.assert_allclose(out[300:-300], ref[300:-300], atol=1e-3)
    # above the new Nyquist frequency: filtered out, not aliased to 6.05 kHz
    assert np.abs(resample(tone(2.0, 9950.0, sr=22050), 22050, 16000)[300:-300]).max() < 1e-3


def test_load_audio_resamples_and_mixes_to_mono(tmp_path: Path) -> None:
    stereo = np.stack([tone(0.5, 440.0, 22050), tone(0.5, 440.0, 22050)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 22050)
    wave = load_audio(tmp_path / "s.wav")
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 8000
    with pytest.raises(AudioError, match="bam_z: audio file not found"):
        load_audio(tmp_path / "missing.ogg", feat_id="bam_z")
