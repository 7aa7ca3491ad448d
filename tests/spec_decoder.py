"""An independent, pure-numpy reader of the exmy checkpoint layout, versions 1.x (1.0, 1.1, 1.2) and 2.x.

Written from ``formats/SPEC.md`` alone (no exmyconv code, no safetensors package, no
lookup tables from other libraries), so that the tests can check that the specification is
complete enough for a stranger to reproduce exmyconv's dequantized values bit for bit, and to
refuse what it refuses (SPEC.md section 6).

Main entry points:

* ``read_file(path)`` / ``read_checkpoint(path)`` -> ``Checkpoint`` with ``.quantized``
  (``QuantizedTensor`` objects, ``.dequantize()`` gives exact float32 values), ``.plain``
  (``PlainTensor`` objects, kept as stored), ``.config`` and ``.tied``; ``.outputs()`` is what a
  decoder outputs (SPEC.md section 4). Anything section 6 refuses raises ``ValueError``;
* ``exmy_values(E, M)``: the value of every code, from the formula of SPEC.md section 1;
* ``parse_format_full(name)`` -> ``(E, M, k)`` (``k = None`` unless a mantissa-shared
  ``eXmYsk`` format, layout 1.1), ``row_bytes``, ``unpack_codes`` / ``unpack_planes``: the
  packed payload of SPEC.md section 3;
* ``f32_to_f16_bits`` / ``f32_to_bf16_bits``: round float32 to fp16 / bf16 bit patterns,
  round-to-nearest-even, in integer arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field

import numpy as np

SUPPORTED_MAJORS = (1, 2)
CURRENT_MAJOR = 2

# safetensors dtype -> little-endian numpy storage type.  BF16 has no numpy type: it is kept as
# its uint16 bit patterns (see ``bf16_bits_to_f32``).
_STORAGE = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
    "F8_E4M3": "u1",  # kept as its bytes (only 8-bit scales use it here)
}


# ----------------------------------------------------------------------------- ExMy numbers

# One digit each: E <= 5, M <= 5 and k <= 8 never need two, and the spec names formats
# "e2m2", "e2m2s4" (lowercase, no leading zeros, no padding).
_FORMAT_RE = re.compile(r"^e([0-9])m([0-9])(?:s([0-9]))?$")


def parse_format_full(name: str) -> tuple[int, int, int | None]:
    """``"e2m2"`` -> ``(2, 2, None)``, ``"e2m2s4"`` -> ``(2, 2, 4)`` (SPEC.md section 1).

    Enforces 1 <= E <= 5, 0 <= M <= 5, 1 + E + M <= 8; a shared format (since 1.1) also
    needs M >= 1 and share count 2 <= k <= 8."""
    m = _FORMAT_RE.match(name) if isinstance(name, str) else None
    if not m:
        raise ValueError(f"not an ExMy format name: {name!r}")
    E, M = int(m.group(1)), int(m.group(2))
    if not (1 <= E <= 5 and 0 <= M <= 5 and 1 + E + M <= 8):
        raise ValueError(f"ExMy format out of range: {name!r}")
    k = None
    if m.group(3) is not None:
        k = int(m.group(3))
        if M < 1 or not 2 <= k <= 8:
            raise ValueError(f"shared ExMy format out of range (needs M >= 1, 2 <= k <= 8): {name!r}")
    return E, M, k


def parse_format(name: str) -> tuple[int, int]:
    """``(E, M)`` of a format name; a shared ``eXmYsk`` has the codes and values of ``eXmY``."""
    E, M, _k = parse_format_full(name)
    return E, M


def exmy_value(code: int, E: int, M: int) -> float:
    """Exact value of one ExMy code (SPEC.md section 1), as a Python float."""
    b = 1 + E + M
    if not 0 <= code < (1 << b):
        raise ValueError(f"code {code} does not fit in {b} bits")
    s = code >> (E + M)
    f = (code >> M) & ((1 << E) - 1)
    m = code & ((1 << M) - 1)
    bias = (1 << (E - 1)) - 1
    emin = 1 - bias
    if f == 0:
        mag = math.ldexp(m, emin - M)
    else:
        mag = math.ldexp((1 << M) + m, f - bias - M)
    return -mag if s else mag


def exmy_values(E: int, M: int) -> np.ndarray:
    """float32 value of every code 0 .. 2^(1+E+M)-1 (code 1 0...0 is -0.0)."""
    vals = [exmy_value(c, E, M) for c in range(1 << (1 + E + M))]
    out = np.array(vals, dtype=np.float64)
    f32 = out.astype(np.float32)
    assert np.array_equal(f32.astype(np.float64), out), "ExMy value not exact in float32"
    return f32


def exmy_max(E: int, M: int) -> float:
    bias = (1 << (E - 1)) - 1
    return math.ldexp(2.0 - math.ldexp(1.0, -M), (1 << E) - 1 - bias)


# ----------------------------------------------------------------------------- bit planes

def plane_widths(b: int) -> list[int]:
    """Plane widths for a b-bit code: the binary digits of b, high to low (8 -> [8])."""
    if not 2 <= b <= 8:
        raise ValueError(f"code width {b} out of range")
    if b == 8:
        return [8]
    return [w for w in (4, 2, 1) if b & w]


def padded_length(K: int, major: int = CURRENT_MAJOR) -> int:
    """Kp: K rounded up to a multiple of 32 (layout 2.x) or of 128 (1.x)."""
    unit = 32 if major == 2 else 128
    return unit * ((K + unit - 1) // unit)


def shared_plane_bytes(Kp: int, k: int, major: int = CURRENT_MAJOR) -> int:
    """Bytes of the shared plane of one row: ceil(Kp/k) bits, padded to a multiple of 4 bytes (2.x)
    or 16 bytes (1.x)."""
    nbits = -(-Kp // k)                      # ceil(Kp / k) shared bits
    unit = 4 if major == 2 else 16
    return unit * -(-nbits // (8 * unit))


def row_bytes(K: int, b: int, k: int | None = None, major: int = CURRENT_MAJOR) -> int:
    """Packed bytes per row (SPEC.md section 3): ``Kp*b/8``, or for a shared format
    ``Kp*(b-1)/8 + 4*ceil(ceil(Kp/k)/32)`` (1.x: ``16*ceil(ceil(Kp/k)/128)``)."""
    Kp = padded_length(K, major)
    if k is None:
        return Kp * b // 8
    return Kp * (b - 1) // 8 + shared_plane_bytes(Kp, k, major)


def _read_plane(plane: np.ndarray, n: int, w: int) -> np.ndarray:
    """Fields 0 .. n-1 of a little-endian plane of width w: field i starts at bit i*w."""
    i = np.arange(n)
    byte = (i * w) // 8                     # element i's field is in this byte ...
    shift = ((i * w) % 8).astype(np.uint8)  # ... starting at this bit (0 = LSB)
    if w == 8:
        return plane[..., byte]
    return (plane[..., byte] >> shift) & np.uint8((1 << w) - 1)


def unpack_planes(packed: np.ndarray, K: int, b: int, k: int | None = None, major: int = CURRENT_MAJOR
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Split packed rows into ``(high, shared)``.

    ``high``: ``uint8[..., Kp]``, the bits held by the per-element planes, concatenated in plane
    order (all b code bits for a plain format; ``code >> 1`` for a shared one).
    ``shared``: ``None``, or for a shared format every bit of the shared plane,
    ``uint8[..., 8 * shared_plane_bytes]`` (bit j = m0 of elements k*j .. k*j+k-1 while
    j < ceil(Kp/k); the rest is padding)."""
    Kp = padded_length(K, major)
    rb = row_bytes(K, b, k, major)
    if packed.dtype != np.uint8 or packed.shape[-1] != rb:
        raise ValueError(f"packed rows must be {rb} uint8, got {packed.shape} {packed.dtype}")
    hb = b if k is None else b - 1           # bits in the per-element planes
    high = np.zeros(packed.shape[:-1] + (Kp,), dtype=np.uint8)
    offset = 0
    for w in plane_widths(hb):
        nbytes = Kp * w // 8
        fld = _read_plane(packed[..., offset:offset + nbytes], Kp, w)
        high = (high << np.uint8(w)) | fld if w < 8 else fld
        offset += nbytes
    if k is None:
        assert offset == rb
        return high, None
    sp = packed[..., offset:]
    assert sp.shape[-1] == shared_plane_bytes(Kp, k, major)
    return high, _read_plane(sp, sp.shape[-1] * 8, 1)


def unpack_codes(packed: np.ndarray, K: int, b: int, k: int | None = None, *,
                 padded: bool = False, major: int = CURRENT_MAJOR) -> np.ndarray:
    """``uint8[..., row_bytes]`` bit planes -> ``uint8[..., K]`` codes (SPEC.md section 3).

    For a shared format (``k`` given) ``code = (high << 1) | bit (i // k) of the shared plane``.
    ``padded=True`` returns all ``Kp`` codes, padding included."""
    high, shared = unpack_planes(packed, K, b, k, major)
    if k is None:
        codes = high
    else:
        Kp = high.shape[-1]
        codes = (high << np.uint8(1)) | shared[..., np.arange(Kp) // k]
    return codes if padded else codes[..., :K]


# ----------------------------------------------------------------------------- float rounding

def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    r = np.where(nan, (u >> 16) | 0x0040, r)  # quiet NaN, sign kept
    return r.astype(np.uint16)


def f32_to_f16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE binary16 bit patterns (uint16), round to nearest, ties to even.

    Overflow gives +-inf, subnormal results are produced (no flush to zero)."""
    x = np.asarray(x, dtype=np.float32)
    u = np.ascontiguousarray(x).reshape(-1).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)                       # |x| bits
    # |x| >= 2^-14 (fp16 normal range): drop 13 of the 23 fraction bits, ties to even, and
    # rebias the exponent (127 -> 15).  A carry out of the fraction bumps the exponent, up to
    # 0x7c00 = inf for |x| >= 65520.
    mag = ((a + np.uint32(0x0FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    mag = np.where(a >= 0x38800000, mag - np.uint32(112 << 10), np.uint32(0))
    mag = np.minimum(mag, np.uint32(0x7C00))
    # |x| < 2^-14: the result counts units of 2^-24.  |x| = sig * 2^(e - 150) with a 24-bit
    # significand sig, so the count is sig / 2^(126 - e), rounded to nearest even.
    sub = np.flatnonzero((a < 0x38800000) & (a >= 0x33000000))   # below 2^-25 rounds to 0
    if sub.size:
        av = a[sub].astype(np.int64)
        e = av >> 23
        sig = (av & 0x7FFFFF) | 0x800000
        sh = 126 - e                                     # 14 ... 24
        q = sig >> sh
        rem = sig - (q << sh)
        half = np.int64(1) << (sh - 1)
        q += (rem > half) | ((rem == half) & ((q & 1) == 1))
        mag[sub] = q.astype(np.uint32)
    nan = a > 0x7F800000
    mag = np.where(nan, np.uint32(0x7E00), mag)
    return (sign | mag).astype(np.uint16).reshape(x.shape)


# ----------------------------------------------------------------------------- safetensors

MAX_HEADER = 100 * 2**20     # SPEC.md section 6: a header length beyond 100 MiB is refused
MAX_DEPTH = 64               # ... as is JSON nested more than 64 levels deep


def _json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects in JSON text (outside strings), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def load_json(text, what: str):
    """JSON text (str or UTF-8 bytes) -> value; ValueError for invalid or too deeply nested JSON."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what}: not UTF-8 ({e})") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _json_depth(text) > MAX_DEPTH:
        raise ValueError(f"{what}: JSON nested more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text)
    except ValueError as e:              # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"{what}: not JSON ({e})") from None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors(path: str) -> tuple[dict, dict[str, tuple[str, list[int], np.ndarray]]]:
    """Parse one .safetensors file: ``(metadata, {name: (dtype, shape, array)})``, with every check
    of SPEC.md section 6 on the header. Arrays are in their stored type (BF16 as uint16 bit patterns)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file")
    with open(path, "rb") as fh:
        blob = fh.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8 or n > MAX_HEADER:
        raise ValueError(f"{path}: header length {n} beyond the file or 100 MiB")
    header = load_json(blob[8:8 + n], f"{path}: header")
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    data = memoryview(blob)[8 + n:]
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    tensors, spans = {}, []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"{path}: entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _STORAGE:
            raise ValueError(f"{path}: {name}: dtype {dtype!r}")
        st = np.dtype(_STORAGE[dtype])
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)
                and math.prod(max(d, 1) for d in shape) * st.itemsize < 2**63):
            raise ValueError(f"{path}: {name}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= len(data)):
            raise ValueError(f"{path}: bad data_offsets for {name}")
        start, end = offsets
        if end - start != math.prod(shape) * st.itemsize:
            raise ValueError(f"{path}: bad data_offsets for {name}")
        if end > start:
            spans.append((start, end, name))
        arr = np.frombuffer(data[start:end], dtype=st).reshape(shape)
        tensors[name] = (dtype, shape, arr)
    spans.sort()
    for (_s0, e0, a), (s1, _e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap")
    return metadata, tensors


# ----------------------------------------------------------------------------- checkpoint

@dataclass
class PlainTensor:
    name: str
    dtype: str          # safetensors dtype
    data: np.ndarray    # stored values (BF16: uint16 bit patterns)

    def as_f32(self) -> np.ndarray:
        if self.dtype == "BF16":
            return bf16_bits_to_f32(self.data)
        return self.data.astype(np.float32)


@dataclass
class QuantizedTensor:
    name: str
    format: str
    shape: list[int]
    source_dtype: str
    group_size: int
    packed: np.ndarray
    scale: np.ndarray    # stored scale values (BF16: uint16 bit patterns)
    scale_dtype: str     # "F16" or "BF16"
    info: dict = field(default_factory=dict)
    major: int = CURRENT_MAJOR  # layout major version of its file: how rows are padded

    def codes(self, padded: bool = False) -> np.ndarray:
        E, M, k = parse_format_full(self.format)
        return unpack_codes(self.packed, self.shape[-1], 1 + E + M, k, padded=padded, major=self.major)

    def planes(self) -> tuple[np.ndarray, np.ndarray | None]:
        E, M, k = parse_format_full(self.format)
        return unpack_planes(self.packed, self.shape[-1], 1 + E + M, k, self.major)

    def scales_f32(self) -> np.ndarray:
        if self.scale_dtype == "BF16":
            return bf16_bits_to_f32(self.scale)
        if self.scale_dtype == "F8_E4M3":  # SPEC.md section 2: e4m3(c) * 2^t, e4m3 = the ExMy formula
            return (exmy_values(4, 3)[self.scale].astype(np.float64) * 2.0 ** self.info["scale_exp"]).astype(np.float32)
        return self.scale.astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """Exact dequantized values ``decode(code[i]) * scale[i // G]`` as float32."""
        E, M = parse_format(self.format)
        K, G = self.shape[-1], self.group_size
        vals = exmy_values(E, M)[self.codes()].astype(np.float64)
        scale = self.scales_f32().astype(np.float64)[..., np.arange(K) // G]
        exact = vals * scale                   # exact in float64 (<= 6 x 11 significand bits)
        out = exact.astype(np.float32)
        # SPEC.md section 2 promises the product fits float32 exactly.
        if not np.array_equal(out.astype(np.float64), exact):
            raise ValueError(f"{self.name}: dequantized product not exact in float32")
        return out

    def dequantize_bits(self, out: str) -> np.ndarray:
        """Dequantized values as bit patterns of ``out`` in {"F32", "F16", "BF16"}."""
        v = self.dequantize()
        if out == "F32":
            return v.view(np.uint32)
        if out == "F16":
            return f32_to_f16_bits(v)
        if out == "BF16":
            return f32_to_bf16_bits(v)
        raise ValueError(out)


@dataclass
class Checkpoint:
    metadata: dict = field(default_factory=dict)      # merged __metadata__ of all files
    quantized: dict = field(default_factory=dict)     # name -> QuantizedTensor
    plain: dict = field(default_factory=dict)         # name -> PlainTensor
    files: list = field(default_factory=list)
    config: dict | None = None                        # config.json (a folder only)
    tied: dict = field(default_factory=dict)          # quantization_config.tied: lm_head -> embedding
    stored_in: dict = field(default_factory=dict)     # stored tensor name -> file name

    def outputs(self) -> list[str]:
        """What a decoder outputs (SPEC.md section 4): every quantized T and stored unquantized tensor,
        and nothing else (a tied lm_head is not stored, so not output)."""
        return sorted([*self.quantized, *self.plain])


_VERSION_RE = re.compile(r"([0-9]+)\.([0-9]+)")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SMALLEST_NORMAL = {"F16": 2.0 ** -14, "BF16": 2.0 ** -126}
F32_MAX = float(np.finfo(np.float32).max)


def _check_version(v, what: str) -> tuple[int, int]:
    """``"1.2"`` -> ``(1, 2)``: two decimal numbers and one dot; refuses another major version
    (SPEC.md section 5)."""
    m = _VERSION_RE.fullmatch(v) if isinstance(v, str) else None
    if not m:
        raise ValueError(f"{what}: bad layout version {v!r}")
    major, minor = int(m.group(1)), int(m.group(2))
    if major not in SUPPORTED_MAJORS:
        raise ValueError(f"{what}: unsupported layout version {v!r} (this reader reads 1.x and 2.x)")
    return major, minor


def _record(path: str, name: str, value: str, version) -> tuple[dict, int, int, int | None]:
    """An ``exmy:T`` record checked against SPEC.md section 4's table -> (record, E, M, k)."""
    if not name:
        raise ValueError(f"{path}: a record without a tensor name")
    info = load_json(value, f"{path}: {name}: record")
    if not isinstance(info, dict):
        raise ValueError(f"{path}: {name}: record is not a JSON object")
    for key in ("format", "shape", "dtype", "group_size"):
        if key not in info:
            raise ValueError(f"{path}: {name}: record has no {key!r}")
    fmt = info["format"]
    try:
        E, M, k = parse_format_full(fmt)
    except ValueError as e:
        raise ValueError(f"{path}: {name}: unknown format {fmt!r} ({e})") from None
    if k is not None and version is not None and version < (1, 1):
        # shared formats exist since 1.1 (SPEC.md section 5); a 1.0 file cannot hold one
        raise ValueError(f"{path}: {name}: shared format {fmt!r} in a layout "
                         f"{version[0]}.{version[1]} file (needs 1.1)")
    shape = info["shape"]
    if not (isinstance(shape, list) and len(shape) >= 2 and all(_is_int(d) and d >= 1 for d in shape)):
        raise ValueError(f"{path}: {name}: record shape {shape!r}")
    if info["dtype"] not in FLOAT_DTYPES:
        raise ValueError(f"{path}: {name}: record dtype {info['dtype']!r}")
    G = info["group_size"]
    if not (_is_int(G) and 1 <= G <= shape[-1]):
        raise ValueError(f"{path}: {name}: bad group size {G!r}")
    rel = info.get("rel_error", 0)
    if not (isinstance(rel, (int, float)) and not isinstance(rel, bool) and math.isfinite(rel) and rel >= 0):
        raise ValueError(f"{path}: {name}: rel_error {rel!r}")
    if "scale_exp" in info:  # 8-bit scales, since 2.0
        t = info["scale_exp"]
        if not (_is_int(t) and -100 <= t <= 100):
            raise ValueError(f"{path}: {name}: scale_exp {t!r}")
        if version is not None and version < (2, 0):
            raise ValueError(f"{path}: {name}: scale_exp in a layout {version[0]}.{version[1]} file (needs 2.0)")
    return info, E, M, k


def _check_scales(q: QuantizedTensor) -> None:
    """SPEC.md section 2, valid scales: finite, >= the smallest normal of the dtype, scale x max finite
    in float32."""
    E, M = parse_format(q.format)
    if q.scale_dtype == "F8_E4M3":  # bytes 0x01 ... 0x7E
        if not np.all((q.scale >= 0x01) & (q.scale <= 0x7E)):
            raise ValueError(f"{q.name}: invalid scales")
        return
    with np.errstate(invalid="ignore"):
        s = q.scales_f32().astype(np.float64)
    if not (np.all(np.isfinite(s)) and np.all(s >= SMALLEST_NORMAL[q.scale_dtype])
            and np.all(s * exmy_max(E, M) <= F32_MAX)):
        raise ValueError(f"{q.name}: invalid scales")


def _add_file(ckpt: Checkpoint, path: str) -> None:
    metadata, tensors = read_safetensors(path)
    base = os.path.basename(path)
    ckpt.files.append(path)
    records = {k[len("exmy:"):]: v for k, v in metadata.items() if k.startswith("exmy:")}
    version = None
    if "exmy_version" in metadata:
        version = _check_version(metadata["exmy_version"], path)
    elif records:
        raise ValueError(f"{path}: records but no exmy_version (SPEC.md section 5)")
    for name in tensors:
        if name in ckpt.stored_in:
            raise ValueError(f"{name!r} is stored in {ckpt.stored_in[name]} and {base}")
        ckpt.stored_in[name] = base
    used = set()
    for name, value in records.items():
        info, E, M, k = _record(path, name, value, version)
        b = 1 + E + M
        shape, G = info["shape"], info["group_size"]
        K, lead = shape[-1], shape[:-1]
        pname, sname = name + "_packed", name + "_scale"
        if pname not in tensors or sname not in tensors:
            raise ValueError(f"{path}: {name}: _packed/_scale not in the same file as its metadata")
        if name in tensors or name in ckpt.quantized:
            raise ValueError(f"{path}: {name}: stored twice")
        pd, ps, parr = tensors[pname]
        sd, ss, sarr = tensors[sname]
        major = version[0] if version is not None else CURRENT_MAJOR  # (a file without records)
        if pd != "U8" or ps != lead + [row_bytes(K, b, k, major)]:
            raise ValueError(f"{name}: packed is {pd} {ps}")
        want = ("F8_E4M3",) if "scale_exp" in info else ("F16", "BF16")
        if sd not in want or ss != lead + [-(-K // G)]:
            raise ValueError(f"{name}: scale is {sd} {ss}")
        q = QuantizedTensor(name=name, format=info["format"], shape=shape, source_dtype=info["dtype"],
                            group_size=G, packed=parr, scale=sarr, scale_dtype=sd, info=info, major=major)
        _check_scales(q)
        ckpt.quantized[name] = q
        used.update((pname, sname))
    for name, (dtype, _shape, arr) in tensors.items():
        if name in used:
            continue
        if records and name.endswith(("_packed", "_scale")):
            raise ValueError(f"{path}: {name} belongs to no record")
        if dtype == "F8_E4M3":  # SPEC.md section 6: only an 8-bit scale tensor has this dtype
            raise ValueError(f"{path}: {name} is F8_E4M3 but no record's scales")
        ckpt.plain[name] = PlainTensor(name=name, dtype=dtype, data=arr)
    for key, value in metadata.items():
        ckpt.metadata.setdefault(key, value)


def read_file(path: str) -> Checkpoint:
    """A single .safetensors file on its own: its exmy_version alone governs (SPEC.md section 5)."""
    ckpt = Checkpoint()
    _add_file(ckpt, path)
    return ckpt


def _read_config(path: str) -> dict:
    config = load_json(open(path, "rb").read(), path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    qc = config.get("quantization_config")
    if qc is None:
        return config
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: quantization_config is not an object")
    if qc.get("quant_method") != "exmy":
        return config
    # SPEC.md section 4: only quant_method is required; the rest has these types when present
    if "format_version" in qc:
        _check_version(qc["format_version"], f"{path}: format_version")
    if "format" in qc and qc["format"] != "auto":
        parse_format_full(qc["format"])
    if qc.get("group_size") is not None and not (_is_int(qc["group_size"]) and qc["group_size"] >= 1):
        raise ValueError(f"{path}: group_size {qc['group_size']!r}")
    ignore = qc.get("ignore")
    if ignore is not None and not (isinstance(ignore, list) and all(isinstance(x, str) for x in ignore)):
        raise ValueError(f"{path}: ignore {ignore!r}")
    tied = qc.get("tied")
    if tied is not None and not (isinstance(tied, dict) and all(isinstance(x, str) for x in tied.values())):
        raise ValueError(f"{path}: tied {tied!r}")
    for key in ("exmyconv_version", "command"):
        if qc.get(key) is not None and not isinstance(qc[key], str):
            raise ValueError(f"{path}: {key} {qc[key]!r}")
    return config


def read_checkpoint(path: str) -> Checkpoint:
    """A checkpoint directory (single file or sharded with an index), or one .safetensors file, with
    every check of SPEC.md section 6."""
    if os.path.isfile(path):
        return read_file(path)
    config_path = os.path.join(path, "config.json")
    config = _read_config(config_path) if os.path.lexists(config_path) else None
    index_path = os.path.join(path, "model.safetensors.index.json")
    weight_map = None
    if os.path.lexists(index_path):
        if not os.path.isfile(index_path):
            raise ValueError(f"{index_path}: not a regular file")
        index = load_json(open(index_path, "rb").read(), index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: no weight_map object")
        for value in weight_map.values():
            if not (isinstance(value, str) and value.endswith(".safetensors") and "/" not in value
                    and "\\" not in value and not value.startswith(".")):
                raise ValueError(f"{index_path}: {value!r} is not a file name of this folder")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{path}: no weight files")
    ckpt = Checkpoint(config=config)
    for f in files:
        _add_file(ckpt, os.path.join(path, f))
    if weight_map is not None:  # keys are stored names, each in the file that holds it, all listed
        for name, file in weight_map.items():
            if ckpt.stored_in.get(name) != file:
                raise ValueError(f"index: {name!r} is not in {file}")
        unlisted = sorted(set(ckpt.stored_in) - set(weight_map))
        if unlisted:
            raise ValueError(f"index does not list {unlisted[0]!r}")
    qc = (config or {}).get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") != "exmy" and ckpt.quantized:
        raise ValueError(f"{config_path}: quant_method {qc.get('quant_method')!r} but exmy records")
    if isinstance(qc, dict) and qc.get("quant_method") == "exmy":
        stored = set(ckpt.quantized) | set(ckpt.plain)
        for name in qc.get("ignore") or []:
            if name in ckpt.quantized:
                raise ValueError(f"{name}: in ignore but quantized")
        ckpt.tied = dict(qc.get("tied") or {})
        for head, emb in ckpt.tied.items():
            if head in stored or emb not in stored:
                raise ValueError(f"tied {head!r} -> {emb!r}: the head must not be stored, the embedding must")
    return ckpt
