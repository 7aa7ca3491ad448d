"""Checks that formats/SPEC.md is enough to read exmy checkpoints bit for bit.

``spec_decoder`` is an independent decoder written from the spec alone; these tests hold it
against the published test vectors, against ml_dtypes' tables, and against exmyconv's own
reader (``exmyconv.checkpoint.load_state_dict``) on checkpoints written by the CLI.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_decoder as sd  # noqa: E402

from exmyconv.checkpoint import load_state_dict  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "formats", "vectors")
VECTOR_FILES = sorted(glob.glob(os.path.join(VECTORS, "*.safetensors")))

# formats/vectors/README.md: case -> (format, group size or None for per channel)
VECTOR_CASES = {
    "e2m2": ("e2m2", None), "e2m2-g32": ("e2m2", 32), "e2m1-g64": ("e2m1", 64),
    "e3m1": ("e3m1", None), "e2m3": ("e2m3", None), "e3m2-g100": ("e3m2", 100),
    "e4m3": ("e4m3", None), "e1m1": ("e1m1", None), "e3m3": ("e3m3", 16),
    "e5m2": ("e5m2", None), "e1m0": ("e1m0", None), "e3m0-g48": ("e3m0", 48),
    "e2m2s4": ("e2m2s4", None), "e2m3s3-g64": ("e2m3s3", 64),
}
VECTOR_SOURCES = {  # name -> (source dtype, shape), from the README
    "layer.sweep.weight": ("F32", [2, 150]),
    "layer.zero_row.weight": ("F16", [3, 130]),
    "layer.experts.weight": ("BF16", [2, 4, 96]),
}

OUT = {"F32": (torch.float32, torch.int32, np.uint32),
       "F16": (torch.float16, torch.int16, np.uint16),
       "BF16": (torch.bfloat16, torch.int16, np.uint16)}
TORCH_BITS = {torch.float32: (torch.int32, np.uint32), torch.float16: (torch.int16, np.uint16),
              torch.bfloat16: (torch.int16, np.uint16)}
ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32"}


def torch_bits(t: torch.Tensor) -> np.ndarray:
    """Bit patterns of a float tensor (so that -0.0 and NaN payloads are compared too)."""
    ibits, nbits = TORCH_BITS[t.dtype]
    return t.detach().contiguous().view(ibits).numpy().view(nbits)


def check_scales(q: sd.QuantizedTensor) -> None:
    """SPEC.md section 2: no scale is zero, subnormal, infinite or NaN; F16 scales never let
    fp16 dequantization overflow."""
    s = q.scales_f32().astype(np.float64)
    tiny = np.finfo(np.float16).tiny if q.scale_dtype == "F16" else float(np.finfo(np.float32).tiny)
    assert np.all(np.isfinite(s)) and np.all(s >= tiny), q.name
    if q.scale_dtype == "F16":
        E, M = sd.parse_format(q.format)
        assert np.all(s * sd.exmy_max(E, M) <= 65504), q.name


def check_padding(q: sd.QuantizedTensor) -> None:
    """SPEC.md section 3: codes past K are padded with code 0."""
    E, M = sd.parse_format(q.format)
    K = q.shape[-1]
    full = sd.unpack_codes(q.packed, sd.padded_length(K), 1 + E + M)
    assert not full[..., K:].any(), q.name


# ============================================================================ ExMy numbers

SPEC_TABLE = {  # SPEC.md section 1: name -> (bits, bias, max, smallest subnormal)
    "e2m1": (4, 1, 6, 0.5), "e2m2": (5, 1, 7, 0.25), "e3m1": (5, 3, 24, 0.125),
    "e2m3": (6, 1, 7.5, 0.125), "e3m2": (6, 3, 28, 0.0625), "e4m3": (8, 7, 480, 2.0 ** -9),
}


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_named_format_table(name):
    bits, bias, vmax, sub = SPEC_TABLE[name]
    E, M = sd.parse_format(name)
    v = sd.exmy_values(E, M).astype(np.float64)
    assert 1 + E + M == bits and (1 << (E - 1)) - 1 == bias
    assert v.max() == vmax == sd.exmy_max(E, M)
    assert v[v > 0].min() == sub
    assert v.min() == -vmax


def test_all_formats_basic_properties():
    for E in range(1, 6):
        for M in range(0, 6):
            if 1 + E + M > 8:
                with pytest.raises(ValueError):
                    sd.parse_format(f"e{E}m{M}")
                continue
            v = sd.exmy_values(E, M)
            half = len(v) // 2
            pos = v[:half].astype(np.float64)
            assert np.all(np.diff(pos) > 0), (E, M)            # magnitudes increase with code
            assert np.all(np.isfinite(v))                        # no inf, no NaN
            assert np.array_equal(v[half:], -v[:half])
            assert v[half].view(np.uint32) == 0x80000000       # code 1 0...0 is -0
            assert pos.max() == sd.exmy_max(E, M)
            # exactly representable in bf16, and in fp16 except E = 5
            assert np.array_equal(sd.bf16_bits_to_f32(sd.f32_to_bf16_bits(v)), v)
            if E < 5:
                assert np.array_equal(sd.f32_to_f16_bits(v).view(np.float16).astype(np.float32), v)
    for bad in ("e0m2", "e6m1", "e2m6", "e4m4", "E2M2", "e2m", "fp8", "e2m2x"):
        with pytest.raises(ValueError):
            sd.parse_format(bad)


@pytest.mark.parametrize("name, mldt", [
    ("e2m1", ml_dtypes.float4_e2m1fn),
    ("e2m3", ml_dtypes.float6_e2m3fn),
    ("e3m2", ml_dtypes.float6_e3m2fn),
])
def test_formula_matches_ml_dtypes(name, mldt):
    E, M = sd.parse_format(name)
    codes = np.arange(1 << (1 + E + M), dtype=np.uint8)
    ref = codes.view(mldt).astype(np.float32)
    assert np.array_equal(sd.exmy_values(E, M).view(np.uint32), ref.view(np.uint32))


def test_e4m3_and_e5m2_differ_from_fp8_only_in_top_binade():
    v = sd.exmy_values(4, 3)
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    same = np.ones(256, bool)
    same[[0x7F, 0xFF]] = False
    assert np.array_equal(v[same].view(np.uint32), ref[same].view(np.uint32))
    assert v[0x7F] == 480 and v[0xFF] == -480 and np.isnan(ref[0x7F])   # SPEC.md section 1
    v = sd.exmy_values(5, 2)
    ref = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2).astype(np.float32)
    top = ((np.arange(256) >> 2) & 0x1F) == 0x1F                       # inf/NaN in float8_e5m2
    assert np.array_equal(v[~top].view(np.uint32), ref[~top].view(np.uint32))
    assert list(v[0x7C:0x80]) == [65536, 81920, 98304, 114688]


# ============================================================================ rounding helpers

def _rounding_inputs() -> np.ndarray:
    rng = np.random.default_rng(1234)
    rand = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # every fp16 value, and the midpoints between neighbours (ties), incl. subnormals and the
    # midpoint between 65504 and 65536
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    nxt = np.append(h[1:], 65536.0)
    mids = ((h + nxt) / 2).astype(np.float32)
    near = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))])
    b = np.arange(0, 0x7F80, dtype=np.uint32) << 16                    # every finite bf16 ...
    bmid = (b | 0x8000).view(np.float32)                               # ... and the ties above
    x = np.concatenate([rand, h.astype(np.float32), mids, near, b.view(np.float32), bmid,
                        np.float32([0, np.inf, 3.4028235e38, 1e-45, 2.0 ** -25, 2.0 ** -24])])
    return np.concatenate([x, -x])


def test_f16_rounding_matches_ieee():
    x = _rounding_inputs()
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(sd.f32_to_f16_bits(x), ref)
    assert np.all(np.isnan(sd.f32_to_f16_bits(np.float32([np.nan])).view(np.float16)))


def test_bf16_rounding_matches_ml_dtypes():
    x = _rounding_inputs()
    x = x[~np.isnan(x)]
    ref = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(sd.f32_to_bf16_bits(x), ref)
    assert np.all(np.isnan(sd.bf16_bits_to_f32(sd.f32_to_bf16_bits(np.float32([np.nan])))))


def test_plane_widths():
    # SPEC.md section 3 table
    assert {b: sd.plane_widths(b) for b in range(2, 9)} == {
        8: [8], 7: [4, 2, 1], 6: [4, 2], 5: [4, 1], 4: [4], 3: [2, 1], 2: [2]}


def test_unpack_example_e2m2():
    # Hand-built row: code c_i = i % 32 for i < 130 (e2m2, b = 5), padded to Kp = 256.
    K, Kp = 130, 256
    codes = np.zeros(Kp, np.uint8)
    codes[:K] = np.arange(K) % 32
    hi, lo = codes >> 1, codes & 1                     # 4-bit plane [s e1 e0 m1], 1-bit plane m0
    plane4 = (hi[0::2] | (hi[1::2] << 4)).astype(np.uint8)
    plane1 = np.packbits(lo, bitorder="little")
    row = np.concatenate([plane4, plane1])[None]
    assert row.shape == (1, Kp * 5 // 8)
    assert np.array_equal(sd.unpack_codes(row, K, 5)[0], codes[:K])


# ============================================================================ test vectors

def test_vectors_present():
    names = {os.path.basename(p)[: -len(".safetensors")] for p in VECTOR_FILES}
    assert names == set(VECTOR_CASES)


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: os.path.basename(p))
def test_vector(path):
    case = os.path.basename(path)[: -len(".safetensors")]
    fmt, group = VECTOR_CASES[case]
    with open(path[: -len(".safetensors")] + ".json") as fh:
        expected = json.load(fh)
    ckpt = sd.read_file(path)
    assert ckpt.metadata["format"] == "pt" and ckpt.metadata["exmy_version"] == "1.1"
    assert set(expected) == set(ckpt.quantized) == set(VECTOR_SOURCES)
    assert list(ckpt.plain) == ["layer.norm.weight"] and ckpt.plain["layer.norm.weight"].data.ndim == 1
    for name, exp in expected.items():
        q = ckpt.quantized[name]
        assert (q.format, q.shape) == (exp["format"], exp["shape"]) and q.format == fmt
        assert (q.source_dtype, q.shape) == VECTOR_SOURCES[name]
        # a requested group size larger than K is recorded as K (e3m2-g100 experts: K = 96)
        assert q.group_size == min(group or q.shape[-1], q.shape[-1])
        check_scales(q)
        check_padding(q)
        for key, out, width in (("f32_bits", "F32", 8), ("f16_bits", "F16", 4), ("bf16_bits", "BF16", 4)):
            got = q.dequantize_bits(out).ravel()
            want = np.array([int(h, 16) for h in exp[key]], dtype=got.dtype)
            assert all(len(h) == width for h in exp[key])
            mism = np.flatnonzero(got != want)
            assert mism.size == 0, (
                f"{case} {name} {key}: {mism.size} mismatches, first at {mism[:5].tolist()}: "
                f"got {[hex(v) for v in got[mism[:3]]]} want {[hex(v) for v in want[mism[:3]]]}")


# ============================================================================ exmyconv CLI

def _cli() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "exmyconv")
    return exe if os.path.exists(exe) else shutil.which("exmyconv")


def quantize(model: str, out: str, *args: str) -> None:
    cmd = [_cli(), "quantize", *args, model, out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"


MINILM_CASES = {
    # id: (CLI arguments, format, group size, embeddings quantized)
    "e2m2-channel": (["--format", "e2m2"], "e2m2", None, False),
    # sharded output as well, to exercise model.safetensors.index.json
    "e3m2-g64-sharded": (["--format", "e3m2", "--group-size", "64", "--max-shard-size", "10MB"],
                         "e3m2", 64, False),
    "e2m1-g32-emb": (["--format", "e2m1", "--group-size", "32", "--quantize-embeddings"],
                     "e2m1", 32, True),
}


class Converted:
    def __init__(self, out_dir: str):
        self.dir = out_dir
        self.ckpt = sd.read_checkpoint(out_dir)
        self.f32 = {n: q.dequantize() for n, q in self.ckpt.quantized.items()}


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    cache = {}

    def get(case: str) -> Converted:
        if case not in cache:
            out = str(tmp_path_factory.mktemp("minilm") / case)
            quantize("@minilm", out, *MINILM_CASES[case][0])
            cache[case] = Converted(out)
        return cache[case]

    return get


def compare_with_exmyconv(conv: Converted, dtype: torch.dtype) -> None:
    ref = load_state_dict(conv.dir, dtype=dtype)
    ck = conv.ckpt
    assert set(ref) == set(ck.quantized) | set(ck.plain)
    out = ST_DTYPE[dtype]
    for name, q in ck.quantized.items():
        t = ref[name]
        assert t.dtype == dtype and list(t.shape) == q.shape, name
        v = conv.f32[name]
        mine = {"F32": lambda: v.view(np.uint32), "F16": lambda: sd.f32_to_f16_bits(v),
                "BF16": lambda: sd.f32_to_bf16_bits(v)}[out]()
        theirs = torch_bits(t)
        mism = np.flatnonzero(mine.ravel() != theirs.ravel())
        assert mism.size == 0, f"{name} ({out}): {mism.size} mismatches, first at {mism[:5].tolist()}"
    for name, p in ck.plain.items():
        t = ref[name]
        # load_state_dict keeps unquantized tensors as stored, whatever dtype is asked for
        assert ST_DTYPE[t.dtype] == p.dtype and list(t.shape) == list(p.data.shape), name
        theirs = torch_bits(t) if t.is_floating_point() else t.contiguous().numpy()
        # byte-for-byte (bit patterns, so -0.0 and NaN payloads count)
        assert np.array_equal(np.ascontiguousarray(theirs).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(p.data).reshape(-1).view(np.uint8)), name


@pytest.mark.parametrize("case", sorted(MINILM_CASES))
def test_minilm_layout(minilm, case):
    args, fmt, group, emb = MINILM_CASES[case]
    conv = minilm(case)
    ck = conv.ckpt
    with open(os.path.join(conv.dir, "config.json")) as fh:
        config = json.load(fh)
    qc = config["quantization_config"]
    assert qc["quant_method"] == "exmy" and qc["format_version"] == "1.1"
    assert qc["format"] == fmt and qc["group_size"] == group
    assert isinstance(qc["exmyconv_version"], str) and qc["exmyconv_version"]
    assert config["model_type"] == "bert" and config["hidden_size"] == 384   # source config kept
    # "ignore lists source weights with >= 2 dimensions that were kept unquantized"
    kept_2d = sorted(n for n, p in ck.plain.items() if p.data.ndim >= 2)
    assert sorted(qc["ignore"]) == kept_2d
    assert ("embeddings.word_embeddings.weight" in ck.quantized) == emb
    assert len(ck.quantized) >= 36
    for name, q in ck.quantized.items():
        assert q.format == fmt and q.source_dtype == "F32" and len(q.shape) == 2
        assert q.group_size == (group or q.shape[-1])
        assert isinstance(q.info["rel_error"], float) and 0 <= q.info["rel_error"] < 1
        check_scales(q)
        check_padding(q)
        v = conv.f32[name]
        assert np.all(np.isfinite(v)), name
        assert np.all(np.isfinite(sd.f32_to_f16_bits(v).view(np.float16))), name
    for p in ck.plain.values():
        if p.dtype in ("F32", "F16", "BF16"):
            assert np.all(np.isfinite(p.as_f32()))
    for md_file in ck.files:
        md, _ = sd.read_safetensors(md_file)
        assert md["format"] == "pt" and md["exmy_version"] == "1.1"
    index = os.path.join(conv.dir, "model.safetensors.index.json")
    if "--max-shard-size" in args:
        with open(index) as fh:
            idx = json.load(fh)
        assert len(ck.files) > 1
        sizes = {}
        for f in ck.files:
            for n, (_dt, _sh, arr) in sd.read_safetensors(f)[1].items():
                sizes[n] = arr.nbytes
                assert idx["weight_map"][n] == os.path.basename(f)
        assert set(idx["weight_map"]) == set(sizes)
        assert idx["metadata"]["total_size"] == sum(sizes.values())
    else:
        assert not os.path.exists(index) and ck.files == [os.path.join(conv.dir, "model.safetensors")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(MINILM_CASES))
def test_minilm_matches_exmyconv(minilm, case, dtype):
    compare_with_exmyconv(minilm(case), dtype)


# ============================================================================ odd shapes / formats

def write_safetensors(path: str, tensors: dict) -> None:
    header, blobs, off = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A tiny HF-style checkpoint with the shapes and value ranges the spec talks about."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("small") / "src"
    d.mkdir()
    a = rng.standard_normal((5, 200)).astype(np.float32)
    a[2] = 0                                                     # zero row: smallest-normal scale
    a[4, :3] = [-0.0, 0.0, -1e-30]                               # -0 and values that round to -0
    big = rng.standard_normal((4, 64)).astype(np.float32)
    big[1] *= 1e5                                                # needs bf16 scales; fp16 overflows
    experts = rng.standard_normal((3, 5, 40)).astype(np.float16)  # 3-D, K < 128
    bf = rng.standard_normal((64, 130)).astype(ml_dtypes.bfloat16).view(np.uint16)
    write_safetensors(str(d / "model.safetensors"), {
        "model.layers.0.mlp.up_proj.weight": ("F32", a),
        "model.layers.0.mlp.down_proj.weight": ("F32", big),
        "model.layers.0.mlp.experts.weight": ("F16", experts),
        "model.layers.0.self_attn.o_proj.weight": ("BF16", bf),
        "model.norm.weight": ("F32", np.linspace(0.5, 1.5, 64, dtype=np.float32)),
    })
    with open(d / "config.json", "w") as fh:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, fh)
    return str(d)


# b = 2 ... 8, M = 0 included (the published vectors have no b = 2 and no M = 0 case)
SMALL_CASES = [("e1m0", "48"), ("e2m0", None), ("e3m0", "32"), ("e5m0", "48"),
               ("e1m5", None), ("e4m2", "48"), ("e2m5", "64"), ("e5m2", "48")]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # fp16 output of the 1e5 row
@pytest.mark.parametrize("fmt, group", SMALL_CASES)
def test_small_model_matches_exmyconv(small_model, tmp_path, fmt, group):
    out = str(tmp_path / "out")
    quantize(small_model, out, "--format", fmt, *(["--group-size", group] if group else []))
    conv = Converted(out)
    ck = conv.ckpt
    assert set(ck.plain) == {"model.norm.weight"} and len(ck.quantized) == 4
    srcs = {"model.layers.0.mlp.up_proj.weight": "F32", "model.layers.0.mlp.down_proj.weight": "F32",
            "model.layers.0.mlp.experts.weight": "F16", "model.layers.0.self_attn.o_proj.weight": "BF16"}
    for name, q in ck.quantized.items():
        assert q.format == fmt and q.source_dtype == srcs[name]
        assert q.group_size == min(int(group or q.shape[-1]), q.shape[-1])
        check_scales(q)
        check_padding(q)
        assert np.all(np.isfinite(conv.f32[name]))
    assert ck.quantized["model.layers.0.mlp.down_proj.weight"].scale_dtype == "BF16"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        compare_with_exmyconv(conv, dtype)
