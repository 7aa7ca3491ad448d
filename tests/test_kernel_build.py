"""CUDA sources in kernels/: they compile for sm_90 with nvcc (CI has nvcc but no GPU), and the
shared decode routine, compiled for the host, reproduces SPEC values for every code of every format.

Skipped only when nvcc (resp. a host C++ compiler) is absent.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from exmyconv.cuda import gpu
from exmyconv.cuda.gpu import GemvKernel
from exmyconv.format.exmy import NAMED, ExMy, all_formats, get_format

ROOT = Path(__file__).resolve().parents[1]
GEMV_SHARED = gpu.GEMV_SHARED  # the shared formats the fused GEMV takes: built like the named formats
KERNELS = ROOT / "kernels"
SOURCES = sorted(KERNELS.glob("*.cu"))
PLAIN = ("llama_ops.cu",)  # no ExMy decoding (bench --e2e's fused decoder-step kernels): compiled once
DECODE_SOURCES = [src for src in SOURCES if src.name not in PLAIN]
FORMATS = [(f.e, f.m) for f in all_formats()]
SHARED = [(f.e, f.m, f.share) for f in all_formats(shared=True)]  # every eXmYsk


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _jobs() -> int:
    return max(2, min(16, os.cpu_count() or 2))


def test_sources_are_packaged_and_share_one_decoder():
    assert SOURCES, "no kernels"
    assert gpu.kernel_dir() == KERNELS or (gpu.kernel_dir() / "exmy_decode.cuh").is_file()
    for name in PLAIN:
        assert (KERNELS / name).is_file() and "#include" not in gpu.kernel_source(name), name
    for src in DECODE_SOURCES:
        text = src.read_text()
        assert '#include "exmy_decode.cuh"' in text, src.name
        assert "decode_group" in text, f"{src.name} does not use the shared decode routine"
        inlined = gpu.kernel_source(src.name)
        assert "#include" not in inlined and "decode_group" in inlined
    # the wheel ships kernels/ as exmyconv/kernels (pyproject force-include)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^"kernels"\s*=\s*"exmyconv/kernels"', pyproject, re.M), "kernels/ not in the wheel"


def _compile(src: Path, fmt: ExMy, out: Path, extra: tuple = ()) -> tuple[int, str]:
    defines = [f"-DEXMY_E={fmt.e}", f"-DEXMY_M={fmt.m}"] + ([f"-DEXMY_SHARE={fmt.share}"] if fmt.share > 1 else [])
    defines += [f"-D{d}" for d in extra]
    cmd = [NVCC, "-arch=sm_90", "--cubin", "-std=c++17", *defines, "--resource-usage", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def gemv_instances(fmt: ExMy) -> list[GemvKernel]:
    """Every exmy_gemv instantiation the host may pick for `fmt`, with its register budget
    (gpu.gemv_blocks; b1r at 2 blocks per SM), with x tiles and without where gpu.gemv_tiled takes either
    by the layer's size (batch 9..16 with bf16 operands); no fp16 operands for E = 5. For bf16 x with
    one scale per row that is mode 4 or 5 (gpu.x16_mode), with mode 3 in its place for tuning (modes
    3, 4, 5: one scale per row only)."""
    operands = ([(0, "F16"), (1, "F16"), ("x16", "BF16"), (3, "BF16")] if fmt.e <= 4 else []) + [(2, "F16"), (2, "BF16")]
    kernels = []
    for mode, x_dtype in operands:
        for kind in gpu.GEMV_KINDS:
            m = gpu.x16_mode(kind) if mode == "x16" else mode
            kernels += [GemvKernel(kind, m, x_dtype, groups, gpu.gemv_blocks(fmt, kind, m, groups), tiled=tiled)
                        for groups in ((0,) if m >= 3 else (0, 1, 2))
                        for tiled in sorted({gpu.gemv_tiled(kind, m, weights) for weights in (1, 1 << 30)})]
    return kernels


def gemv_builds() -> list[tuple[ExMy, list[GemvKernel]]]:
    """The GEMV instantiations compiled per format: all of them for the named formats and e5m2;
    for the other formats (and the shared ones the GEMV takes, gpu.GEMV_SHARED) the fp16-operand batch-1 and batch-8 ones
    (E <= 4) and the bf16-operand b1r one with unaligned groups, which between them run every
    decode path, and for those shared formats every bf16 row-scale (mode 3) kernel; and the b1r kernels built for 3 blocks per SM (gpu.gemv_b1r_blocks uses fold/two
    with one scale per row for codes of other than 6 bits; the GPU tests force the others): fold,
    two, fold with aligned groups, bf16 operands, unaligned groups. For the named formats, also the
    routed copies (exmy_gemv_routed, MoE experts) of their batch-1 kernels with one scale per row or
    aligned groups. Every gemv.cu build also has exmy_x_tiles (x tiles in each conversion, gpu.x_tiles_conv)."""
    builds = []
    for fmt in all_formats() + [get_format(name) for name in GEMV_SHARED]:
        if fmt.name in NAMED or fmt.name == "e5m2":
            kernels = gemv_instances(fmt)
        else:
            kernels = [k for k in gemv_instances(fmt) if (k.kind, k.mode, k.groups) in (("b1", 0, 0), ("nt1", 0, 0))
                       or (k.kind, k.x_dtype, k.groups) == ("b1r", "BF16", 2)
                       or (fmt.name in GEMV_SHARED and k.mode in (4, 5))]
        if fmt.name in NAMED + GEMV_SHARED and fmt.bits != 6:
            kernels += [replace(k, blocks=3) for k in gemv_instances(fmt) if k.kind == "b1r" and (
                (k.mode, k.groups) in ((0, 0), (1, 0), (0, 1)) or (k.mode, k.x_dtype, k.groups) in
                ((2, "F16", 0), (2, "BF16", 2)))]
        if fmt.name in NAMED + GEMV_SHARED:
            kernels += [replace(k, routed=True) for k in kernels if k.groups != 2 and k.mode != 3 and (
                k.kind == "b1" or (k.kind == "b1r" and k.blocks == 2))]  # (routed b1r: 2 blocks per SM only)
        builds.append((fmt, kernels))
    return builds


def gemv_source(kernels: list[GemvKernel], path: Path) -> Path:
    """A source that builds `kernels` from kernels/gemv.cu (what NVRTC's name expressions do)."""
    lines = [f'#include "{KERNELS / "gemv.cu"}"'] + [
        f"EXMY_GEMV_{'ROUTED_' if k.routed else ''}INSTANCE({k.expression})" for k in kernels] + [
        f"EXMY_X_TILES_INSTANCE(exmy_x_tiles<{gpu.x_tiles_threads(conv)}, {conv}>)"
        for conv in (gpu.X_COPY, gpu.X_BF16, gpu.X_SCALED)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _jobs_for(tmp_path) -> list[tuple[Path, ExMy, Path, list[GemvKernel], tuple]]:
    """(source, format, cubin, GEMV instantiations, defines): gemv.cu as gemv_builds says, one compilation
    per format (first: the longest jobs), again in tile order (EXMY_TILE, gpu.tile_order) for the
    unshared formats, and every other source for every format (dequant.cu in tile order too)."""
    jobs = []
    for f, kernels in gemv_builds():
        src = gemv_source(kernels, tmp_path / f"gemv_{f.name}.cu")
        jobs.append((src, f, src.with_suffix(".cubin"), kernels, ()))
        if f.share == 1:
            tiled = [replace(k, order="tile") for k in kernels]
            jobs.append((src, f, tmp_path / f"gemv_{f.name}_tile.cubin", tiled, gpu.order_defines("tile")))
    for src in DECODE_SOURCES:
        if src.name != "gemv.cu":
            jobs += [(src, f, tmp_path / f"{src.stem}_{f.name}.cubin", [], ()) for f in all_formats()]
    jobs += [(KERNELS / "dequant.cu", f, tmp_path / f"dequant_{f.name}_tile.cubin", [], gpu.order_defines("tile"))
             for f in all_formats()]
    # shared formats: every source but gemv.cu for a few formats of every k (every shared-bit
    # expansion path: k = 2, 4, 8 bit spreads, k = 3, 5, 6, 7 the general one) and the named ones
    for f in all_formats(shared=True):
        if f.name in GEMV_SHARED or (f.e, f.m) in ((2, 2), (2, 3), (1, 1), (4, 3), (5, 2)):
            jobs += [(src, f, tmp_path / f"{src.stem}_{f.name}.cubin", [], ()) for src in DECODE_SOURCES
                     if src.name != "gemv.cu"]
    return jobs


# ptxas --resource-usage of one exmy_gemv (or exmy_gemv_routed) instantiation (mangled:
# exmy_gemvILi3ELi0ELb1ELi0ELi2E...)
GEMV_USAGE = re.compile(r"Function properties for _Z\d+exmy_gemv(_routed)?ILi(\d)ELi(\d)ELb([01])ELi(\d)ELi(\d)E(?:Lb([01])E)?\w*\n"
                        r"\s+\d+ bytes stack frame, (\d+) bytes spill stores.*\n.*Used (\d+) registers")


def gemv_usage(log: str) -> dict[str, tuple[int, int]]:
    """{C++ name of an instantiation: (registers, bytes spilled)} from an nvcc --resource-usage log."""
    found = {}
    for routed, kind, mode, xf16, groups, blocks, tiled, spill, regs in GEMV_USAGE.findall(log):
        xf16 = "true" if xf16 == "1" else "false"
        tiled = "" if routed else f", {'true' if tiled == '1' else 'false'}"  # (XT: exmy_gemv only)
        found[f"exmy_gemv{routed}<{kind}, {mode}, {xf16}, {groups}, {blocks}{tiled}>"] = (int(regs), int(spill))
    return found


def spill_limit(fmt: ExMy, kernel: GemvKernel) -> int | None:
    """Bytes a GEMV instantiation may spill: none for the fp16-operand kernels of the named formats
    with one scale per row or aligned groups (fast paths); at most 32 for the 80-register b1r builds
    gpu uses (fp16 operands, one scale per row); at most 128 for nt1w and nt2w where gpu takes them (codes
    of <= 6 bits, gpu.gemv_wide: two row tiles per warp; 5-bit codes with a 1-bit plane spill there, and
    it still ran faster than nt2 on an H200, docs/benchmarks.md); at most 8 for the routed kernels
    (exmy_gemv_routed keeps x, y and the scales at per-pair addresses in registers: 4 bytes for
    e3m2 b1r with groups); the others may spill a little."""
    if kernel.routed:
        return 8 if fmt.name in NAMED + GEMV_SHARED and kernel.mode != 2 and kernel.groups != 2 else None
    if kernel.kind in ("nt1w", "nt2w"):
        return 128 if fmt.name in NAMED and fmt.bits <= 6 and kernel.mode != 2 and kernel.groups != 2 else None
    if kernel.kind == "b1r" and kernel.blocks == 3:
        return 32 if kernel.mode != 2 and kernel.groups == 0 else None
    return 0 if fmt.name in NAMED and kernel.mode != 2 and kernel.groups != 2 else None


@needs_nvcc
def test_every_kernel_compiles_for_sm90(tmp_path):
    jobs = _jobs_for(tmp_path)
    with ThreadPoolExecutor(_jobs()) as pool:
        results = list(pool.map(lambda job: _compile(*job[:3], job[4]), jobs))
    what = [f"{src.name} {f.name}{' tile order' if defines else ''}" for src, f, _, _, defines in jobs]
    failed = [(w, log) for w, (rc, log) in zip(what, results) if rc != 0]
    assert not failed, "\n\n".join(f"{w}:\n{log[-3000:]}" for w, log in failed[:3])
    for w, (_, log) in zip(what, results):
        assert "warning" not in log.lower(), f"{w}:\n{log[-2000:]}"
    # every GEMV instantiation: within the registers of its blocks per SM, and the spill limits
    for w, (_, f, _, kernels, _), (_, log) in zip(what, jobs, results):
        check_usage(w, f, kernels, log)


def check_usage(what: str, fmt: ExMy, kernels: list[GemvKernel], log: str, spills: bool = True) -> None:
    """Every GEMV instantiation of an nvcc log: within the registers of its blocks per SM and (spills)
    within spill_limit."""
    usage = gemv_usage(log)
    for k in kernels:
        assert k.expression in usage, f"{what}: no resource usage of {k.expression}:\n{log[-2000:]}"
        regs, spill = usage[k.expression]
        assert regs <= 65536 // (gpu.GEMV_WARPS * 32 * k.blocks) // 8 * 8, f"{what} {k.name}: {regs} registers"
        limit = spill_limit(fmt, k)
        assert not spills or limit is None or spill <= limit, f"{what} {k.name} ({k.expression}) spills {spill} bytes"


@needs_nvcc
@pytest.mark.parametrize("define, kernels", [  # (kind, mode, x dtype, groups[, x tiles])
    # timing-only knock-outs (x loads, decode and mma left out, all three here)
    ("GEMV_DIAG=7", [("b1", 4, "BF16", 0), ("nt2w", 0, "F16", 0), ("b1r", 2, "BF16", 1)]),
    # two alternating register sets where the tuned build has one (5-bit codes in b1, the two-tile kinds;
    # b1 in mode 4 spills 28 bytes at 3 blocks per SM with them), and one where it has two (nt1, nt2)
    ("GEMV_PP=1", [("b1", 0, "F16", 0), ("b1r", 0, "F16", 0)]),
    ("GEMV_PP=-1", [("nt1", 0, "F16", 0), ("nt2", 0, "F16", 0)]),
    # L2 bulk prefetch of the weights in tile order, two iterations beyond the register prefetch
    ("GEMV_L2PF=2;EXMY_TILE=1", [("b1", 0, "F16", 0), ("b1r", 0, "F16", 0), ("nt1w", 0, "F16", 0),
                                 ("nt2w", 0, "F16", 0)]),
    # the kinds with x tiles: their first iterations into L2 first thing, two of them, or none
    ("GEMV_WARM=2;EXMY_TILE=1", [("nt2", 0, "F16", 0, True), ("nt2w", 0, "F16", 0, True), ("nt1w", 5, "BF16", 0, True)]),
    ("GEMV_WARM=0;EXMY_TILE=1", [("nt2", 0, "F16", 0, True), ("nt2w", 0, "F16", 0, True)]),
])
def test_gemv_option_builds_compile(tmp_path, define, kernels):
    """gemv.cu's build options that no default build uses (``;`` joins two) compile for e2m2 and e3m2 without
    warnings, within their registers (and but for GEMV_DIAG within the spill limits of the default builds)."""
    for fmt in (get_format("e2m2"), get_format("e3m2")):
        built = [GemvKernel(kind, mode, x, groups, gpu.gemv_blocks(fmt, kind, mode, groups), tiled=bool(tiled))
                 for kind, mode, x, groups, *tiled in kernels]
        src = gemv_source(built, tmp_path / f"opt_{fmt.name}.cu")
        rc, log = _compile(src, fmt, src.with_suffix(".cubin"), tuple(define.split(";")))
        assert rc == 0 and "warning" not in log.lower(), log[-3000:]
        check_usage(f"{define} {fmt.name}", fmt, built, log, spills=not define.startswith("GEMV_DIAG"))


@needs_nvcc
@pytest.mark.parametrize("name", PLAIN)
def test_plain_kernel_compiles_for_sm90(tmp_path, name):
    cmd = [NVCC, "-arch=sm_90", "--cubin", "-std=c++17", "-o", str(tmp_path / "k.cubin"), str(KERNELS / name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "warning" not in log.lower(), log[-3000:]


def _load_script(name: str):
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@needs_nvcc
def test_stream_probe_compiles_for_sm90(tmp_path):
    """scripts/stream_probe.cu (the read-bandwidth probe) builds every kernel its runner launches by
    default, without warnings or spills (a spill would put local-memory traffic into a bandwidth
    figure)."""
    probe = _load_script("stream-probe")
    configs = [probe.parse_config(c) for c in probe.DEFAULT_CONFIGS.split(",")]
    assert {c["kind"] for c in configs} == {"regs", "bulk"} and {c["map"] for c in configs if "map" in c} == set(probe.MAPS)
    with pytest.raises(SystemExit):
        probe.parse_config("regs:quad:16:128")
    src = tmp_path / "probe.cu"
    lines = dict.fromkeys(probe.instance(c) for c in configs)
    src.write_text(f'#include "{probe.SOURCE}"\n' + "\n".join(lines) + "\n")
    cmd = [NVCC, "-arch=sm_90", "--cubin", "-std=c++17", "--resource-usage", "-o", str(tmp_path / "p.cubin"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "warning" not in log.lower(), log[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores", log)
    assert len(spills) == len(lines) and set(spills) == {"0"}, log[-3000:]


HOST_CHECK = r"""
#include "exmy_decode.cuh"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
using namespace exmy;

static double spec_value(int code) {  // SPEC 1, literally
    int s = code >> (E + M), f = (code >> M) & ((1 << E) - 1), m = code & ((1 << M) - 1);
    double mag = f == 0 ? std::ldexp((double)m, 1 - BIAS - M) : std::ldexp((double)((1 << M) + m), f - BIAS - M);
    return s ? -mag : mag;
}
static int spec_code(const std::vector<u8>& row, int kp, int i) {  // SPEC 3, bit by bit
    int code = 0, off = 0;
    for (int w : {8, 4, 2, 1}) {
        if (!(OWN & w)) continue;
        int field = 0;
        for (int b = 0; b < w; ++b) {
            long pos = (long)i * w + b;
            field |= ((row[off + pos / 8] >> (pos % 8)) & 1) << b;
        }
        code = (code << w) | field;
        off += kp * w / 8;
    }
    if (SHARED) {  // then bit i // k of the shared plane
        int j = i / SHARE;
        code = (code << 1) | ((row[off + j / 8] >> (j % 8)) & 1);
    }
    return code;
}
static int row_len(int kp) {  // SPEC 3 row_bytes
    int groups = (kp + SHARE - 1) / SHARE;
    return kp * OWN / 8 + (SHARED ? 16 * ((groups + 127) / 128) : 0);
}
static double f16_value(u32 h) {
    int s = h >> 15, ex = (h >> 10) & 31, mant = h & 1023;
    double mag = ex == 0 ? std::ldexp((double)mant, -24) : std::ldexp((double)(1024 + mant), ex - 25);
    return s ? -mag : mag;
}
static double bf16_value(u32 h) { u32 b = h << 16; float f; std::memcpy(&f, &b, 4); return (double)f; }

int main(int argc, char** argv) {
    std::mt19937 rng(argc > 1 ? (unsigned)strtoul(argv[1], 0, 10) : 1u);
    const int kp = 1024;  // 32 chunks: every residue of 32c mod k for k <= 8
    long bad = 0, checked = 0;
    unsigned seen = 0;  // pair_elem must be a permutation of the chunk's 32 elements
    for (int p = 0; p < 16; ++p)
        for (int lane = 0; lane < 2; ++lane) seen |= 1u << pair_elem(p, lane);
    if (seen != 0xFFFFFFFFu) { printf("pair_elem is not a permutation: %08x\n", seen); return 1; }
    for (int trial = 0; trial < 48; ++trial) {
        std::vector<u8> row(row_len(kp));
        for (auto& b : row) b = (u8)rng();
        if (trial == 0) {  // every code, packed per SPEC 3
            std::fill(row.begin(), row.end(), 0);
            int off = 0, rem = OWN;
            for (int w : {8, 4, 2, 1}) {
                if (!(OWN & w)) continue;
                rem -= w;
                for (int i = 0; i < kp; ++i) {
                    int field = (((i * 37 + 11) % (1 << OWN)) >> rem) & ((1 << w) - 1);
                    for (int b = 0; b < w; ++b) {
                        long pos = (long)i * w + b;
                        if ((field >> b) & 1) row[off + pos / 8] |= (u8)(1 << (pos % 8));
                    }
                }
                off += kp * w / 8;
            }
            for (int j = 0; j < kp / SHARE; ++j)  // shared formats: alternate bit patterns per 8 groups
                if (SHARED && ((j * 7 + j / 8) & 1)) row[off + j / 8] |= (u8)(1 << (j % 8));
        }
        for (u32 c = 0; c < (u32)kp / 32; ++c) {
            Chunk ch = chunk_from_bytes(row.data(), kp, c);
            Pre pre = prepare(ch, c);
            for (int e = 0; e < 8; ++e) {
                u32 hb[2], hf[2] = {0, 0}, hl[2] = {0, 0};
                decode_group<true>(ch, pre, e, hb[0], hb[1]);
                if (F16_OK) {
                    decode_group<false>(ch, pre, e, hf[0], hf[1]);
                    hl[0] = to_field<false>(lane_word(ch, pre, e, 0));  // lane path too
                    hl[1] = to_field<false>(lane_word(ch, pre, e, 1));
                }
                for (int s = 0; s < 2; ++s)
                    for (int lane = 0; lane < 2; ++lane) {
                        int el = pair_elem(2 * e + s, lane);
                        int code = spec_code(row, kp, 32 * (int)c + el);
                        double want = spec_value(code);
                        u32 neg = (u32)(code >> (E + M));
                        u32 b16 = (hb[s] >> (16 * lane)) & 0xFFFF;
                        ++checked;
                        if (std::ldexp(bf16_value(b16), 127 - BIAS) != want || (b16 >> 15) != neg)
                            if (bad++ < 10) printf("bf16 e%dm%d el=%d code=%d bits=%04x\n", E, M, el, code, b16);
                        if (F16_OK)
                            for (u32* hv : {hf, hl}) {
                                u32 h16 = (hv[s] >> (16 * lane)) & 0xFFFF;
                                if (std::ldexp(f16_value(h16), 15 - BIAS) != want || (h16 >> 15) != neg)
                                    if (bad++ < 10) printf("f16 e%dm%d el=%d code=%d bits=%04x\n", E, M, el, code, h16);
                            }
                    }
            }
        }
    }
    printf("e%dm%ds%d: %ld values, %ld mismatches\n", E, M, SHARE, checked, bad);
    return bad ? 1 : 0;
}
"""


def _host_cxx() -> list[str] | None:
    for cxx in ("g++", "clang++", "c++"):
        if shutil.which(cxx):
            return [cxx, "-O1", "-std=c++17"]
    if NVCC:
        return [NVCC, "-x", "cu", "-std=c++17"]
    return None


@pytest.mark.skipif(_host_cxx() is None, reason="no host C++ compiler")
def test_decode_routine_on_host_matches_spec(tmp_path, seed):
    src = tmp_path / "check.cpp"
    src.write_text(HOST_CHECK)
    cxx = _host_cxx()

    def one(em):
        e, m, share = (*em, 1)[:3]
        exe = tmp_path / f"check_e{e}m{m}s{share}"
        build = subprocess.run([*cxx, f"-I{KERNELS}", f"-DEXMY_E={e}", f"-DEXMY_M={m}", f"-DEXMY_SHARE={share}",
                                str(src), "-o", str(exe)],
                               capture_output=True, text=True, timeout=600)
        if build.returncode:
            return f"e{e}m{m}: build failed\n{build.stderr[-2000:]}"
        run = subprocess.run([str(exe), str(seed % 2**32)], capture_output=True, text=True, timeout=120)
        return None if run.returncode == 0 else f"e{e}m{m}: {run.stdout[-2000:]}"

    with ThreadPoolExecutor(_jobs()) as pool:
        problems = [p for p in pool.map(one, FORMATS + SHARED) if p]
    assert not problems, "\n".join(problems)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
