// exmy_decode.cuh - the one ExMy decode routine shared by every exmyconv kernel.
//
// Layout (formats/SPEC.md section 3): a row of Kp = 32*ceil(K/32) codes is cut into bit planes
// of 8, 4, 2 and 1 bits (the binary digits of the code width b, most significant code bits in the
// widest plane). A w-bit plane stores element i at bit i*w, little-endian.
//
// Unit of work: a CHUNK of 32 consecutive elements of one row. Its plane words are
//   8-bit plane: 32 bytes = w8[0..7]  (w8[j] byte i = code of element 4j+i)
//   4-bit plane: 16 bytes = w4[0..3]  (w4[j] nibble i = top 4 code bits of element 8j+i)
//   2-bit plane:  8 bytes = w2[0..1]  (w2[j] bits 2i+1..2i = 2-bit field of element 16j+i)
//   1-bit plane:  4 bytes = w1        (bit i = 1-bit field of element i)
// All four are naturally aligned: plane offsets are multiples of 16 (4-bit plane, and 2-bit after
// it), 8 (1-bit after 4 + 2) and 4 (shared plane), and the host lays rows out at a stride that is a
// multiple of 16 bytes (cuda/gpu.py device_stride: the stored rows are only 4-byte multiples).
//
// Decoding works on GROUPS: group e (0..7) of a chunk is elements {e, e+8, e+16, e+24}, one per
// byte of a 32-bit word. Every plane can hand over group e's fields as "byte i holds the field of
// element e+8i at bit offset o" with at most one PRMT per group, so 4 elements are assembled with
// each shift/mask. The group is then spread into two fp16/bf16 pair words:
//   pair p = 2e+s (s = 0, 1): low 16-bit lane = element e+16s, high lane = element e+16s+8.
// Formats whose codes live in the 4-bit plane alone (OWN = 4, "NIB": e2m1, e2m2s4, ...) skip the
// byte transpose: group e is byte i = 0..3 of w4[e/2], nibble e%2, i.e. elements 8(e/2) + 2i + e%2.
// pair_elem(p, lane) gives the order; kernels permute x (GEMV) or un-permute outputs to match.
//
// Value trick (register decode, no table): put the code's exponent field f in the LOW E bits of the
// fp16 (or bf16) exponent field and its M mantissa bits at the TOP of the fp16 (bf16) mantissa.
// The fp16 number is then exactly v * 2^(bias - 15) (bf16: v * 2^(bias - 127)), subnormal codes
// (f = 0) included, because fp16/bf16 subnormals scale the same way. One exact multiply by
// 2^(15 - bias) (2^(127 - bias)) gives v; kernels fold it into the scale where that cannot overflow.
// E = 5 formats fill the whole fp16 exponent field (f = 31 would read as inf/NaN), so they are
// decoded through the bf16 field placement only.
//
// Shared formats eXmYsk (SPEC 1.1, compile with -DEXMY_SHARE=k): the planes hold code >> 1 (OWN =
// BITS - 1 bits, cut by the binary digits of OWN), so every plane field sits one code bit higher,
// and a SHARED plane after them holds bit j = m0 of elements k*j .. k*j+k-1 of the padded row.
// load_* keep the raw shared-plane word(s) holding a chunk's bits (Chunk.sw); prepare() expands
// them into `ws`, a word laid out exactly like the 1-bit plane (bit i = m0 of element i of the
// chunk), which the decode then places at code bit 0 like plane 1. Expanding at decode time, not
// at load time, keeps a prefetch's loads free of consumers until the data is needed.
//
// This header is compiled for the device (NVRTC via CuPy, or nvcc) and for the host (the build
// test runs the same routine on the CPU against an independent decoder).
#pragma once

#ifdef __CUDACC__
#define EXMY_HD __host__ __device__ __forceinline__
#else
#define EXMY_HD inline
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

#ifndef EXMY_E
#define EXMY_E 2
#endif
#ifndef EXMY_M
#define EXMY_M 2
#endif
#ifndef EXMY_TILE
#define EXMY_TILE 0  // 1: the payload in tile order (below)
#endif
#ifndef EXMY_SHARE
#define EXMY_SHARE 1
#endif

namespace exmy {

constexpr int E = EXMY_E;
constexpr int M = EXMY_M;
constexpr int BITS = 1 + E + M;
constexpr int BIAS = (1 << (E - 1)) - 1;
constexpr int SHARE = EXMY_SHARE;          // k elements share m0 (1: unshared format)
constexpr bool SHARED = SHARE > 1;
constexpr int SH = SHARED ? 1 : 0;         // code bits below the plane fields (the shared m0)
constexpr int OWN = BITS - SH;             // code bits stored per element in the planes
static_assert(E >= 1 && E <= 5 && M >= 0 && M <= 5 && BITS <= 8, "no such ExMy format");
static_assert(SHARE >= 1 && SHARE <= 8 && (SHARE == 1 || M >= 1), "no such shared format");

// Planes present: the binary digits of OWN (SPEC 3; OWN = BITS when unshared).
constexpr bool HAS8 = (OWN & 8) != 0;
constexpr bool HAS4 = (OWN & 4) != 0;
constexpr bool HAS2 = (OWN & 2) != 0;
constexpr bool HAS1 = (OWN & 1) != 0;
// Lowest code bit held by each plane (planes take code bits from the top, widest first).
constexpr int LO4 = BITS - 4;         // 4-bit plane: code bits BITS-1 .. BITS-4
constexpr int LO2 = (OWN & 1) + SH;   // 2-bit plane: the two bits just above the 1-bit plane / m0
constexpr int LO1 = SH;               // 1-bit plane: code bit 0 (shared: bit 1, above m0)
// (8-bit plane: bits 7..0, never in a shared format since OWN <= 7; shared m0: code bit 0.)

// fp16 fast path: the whole fp16 value lives in its high byte [s e4..e0 m9 m8] when M <= 2; for
// M = 3 all but the lowest mantissa bit does, which goes to bit 7 of the low byte (f16_low_bytes).
constexpr bool F16_OK = E <= 4;
constexpr bool BYTE_PATH = F16_OK && !HAS8 && (M <= 2 || (M == 3 && !(OWN == 4 && SHARED)));  // (OWN = 4: NIB)
// Nibble-only formats (OWN = 4: e2m1, e1m2, e3m0 and the 5-bit shared ones such as e2m2s4) group
// the elements of one 4-bit plane word instead of transposing four words (see pair_elem).
constexpr bool NIB = OWN == 4;
// k = 4 with a nibble-only plane: a chunk's 8 shared bits are kept as they are (Pre.ws).
constexpr bool NIB4 = NIB && SHARE == 4;
// e2m2s4: the byte path puts the magnitude at byte bits 3..1 and the shared m0 at bit 0, so
// Pre.sm need not clear bits 1..3 and 7 (f16_high_bytes overwrites them; code_word masks them).
constexpr bool SM_LOOSE = NIB4 && F16_OK && M == 2;
// k divides 32 (2, 4, 8): a chunk's 32/k shared bits lie in one word at a multiple of 32/k.
constexpr bool SHARE_POW2 = SHARE == 2 || SHARE == 4 || SHARE == 8;

// ------------------------------------------------------------------------- bit helpers

// x shifted left by S (right by -S); S is a compile-time constant after unrolling.
EXMY_HD u32 shl(u32 x, int s) { return s >= 0 ? (x << s) : (x >> -s); }

// PRMT: result byte i = byte (sel >> 4i) & 7 of the 8-byte value {b:a} (a = bytes 0..3).
// (Mode bit 3 of each selector nibble is never set here.)
EXMY_HD u32 prmt(u32 a, u32 b, u32 sel) {
#ifdef __CUDA_ARCH__
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
#else
    u64 v = ((u64)b << 32) | a;
    u32 d = 0;
    for (int i = 0; i < 4; ++i) d |= (u32)((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return d;
#endif
}

// Element (0..31 in the chunk) held by lane `lane` (0 = bits 15..0, 1 = bits 31..16) of pair p.
// Group e = p/2 holds one element per byte i = 0..3; pair p takes bytes 0, 1 (p even) or 2, 3.
//   general:  group e = elements e + 8i            -> pair p = (e + 16(p&1), e + 16(p&1) + 8)
//   NIB:      group e = elements 8(e/2) + 2i + e%2 (byte i of 4-bit word e/2, nibble e%2)
//                                                  -> pair p = (8(p/4) + 4(p&1) + e%2, ... + 2)
EXMY_HD constexpr int pair_elem(int p, int lane) {
    return NIB ? 8 * (p >> 2) + 4 * (p & 1) + 2 * lane + ((p >> 1) & 1)
               : (p >> 1) + 16 * (p & 1) + 8 * lane;
}

// ------------------------------------------------------------------------- chunk loading

struct Chunk {
    u32 w8[HAS8 ? 8 : 1];
    u32 w4[HAS4 ? 4 : 1];
    u32 w2[HAS2 ? 2 : 1];
    u32 w1;
    u32 sw[SHARE_POW2 ? 1 : 2];  // shared formats: the shared-plane words holding the chunk's first
                                 // and last shared bit (one word when k divides 32); unshared: 0
};

// Byte offsets of the planes inside a row of kp (padded) elements: widest plane first.
EXMY_HD u32 off4(u32 kp) { (void)kp; return 0; }                       // 4-bit plane is first when present
EXMY_HD u32 off2(u32 kp) { return HAS4 ? kp / 2 : 0; }                // after the 4-bit plane (kp/2 bytes)
EXMY_HD u32 off1(u32 kp) { return (HAS4 ? kp / 2 : 0) + (HAS2 ? kp / 4 : 0); }  // after 4- and 2-bit planes
EXMY_HD u32 offs(u32 kp) { return kp / 8 * OWN; }                     // shared plane: after all OWN bits

// Padded row length Kp = 32 * ceil(K / 32) (SPEC 3, layout 2).
EXMY_HD u32 padded_k(u32 k) { return (k + 31) / 32 * 32; }

// Shared bits of chunk c: `lo` = 32-bit word of the shared plane holding bit j0 = floor(32c / k)
// (the group of the chunk's element 0), `hi` = the word holding bit j1 = floor((32c + 31) / k)
// (the group of element 31; the same word or the next). Returns the chunk's ws word: bit i =
// shared bit floor((32c + i) / k) - j0 of the window that starts at bit j0.
EXMY_HD u32 expand_shared(u32 lo, u32 hi, u32 c) {
    if (!SHARED) return 0u;
    const u32 j0 = 32 * c / SHARE;                     // group of the chunk's first element
    const u32 r = 32 * c - j0 * SHARE;                 // elements of that group before the chunk
    const u32 o = j0 & 31;                             // bit j0's position in `lo`
    const u32 win = SHARE_POW2 ? lo >> o               // window: bit t = shared bit j0 + t (k | 32:
                  : (lo >> o) | (o ? hi << (32 - o) : 0u);  // the chunk's bits never cross a word)
    if (NIB4) return win & 0xFFu;                      // the chunk's 8 bits as they are (prepare spreads them)
    if (SHARE == 2) {  // 16 bits -> each bit twice (r = 0): spread bit t to bit 2t, then * 0b11
        u32 x = win & 0xFFFFu;
        x = (x | (x << 8)) & 0x00FF00FFu;              // bits 8..15 -> 16..23
        x = (x | (x << 4)) & 0x0F0F0F0Fu;              // nibbles apart
        x = (x | (x << 2)) & 0x33333333u;              // pairs apart
        x = (x | (x << 1)) & 0x55555555u;              // bit t at 2t
        return x * 3u;                                 // 2t -> 2t, 2t+1 (no carries: gaps of 1)
    } else if (SHARE == 4) {  // 8 bits -> each bit 4 times (r = 0): bit t to bit 4t, then * 0xF
        u32 x = win & 0xFFu;
        x = (x | (x << 12)) & 0x000F000Fu;             // bits 4..7 -> 16..19
        x = (x | (x << 6)) & 0x03030303u;              // 2-bit runs one per byte
        x = (x | (x << 3)) & 0x11111111u;              // bit t at 4t
        return x * 0xFu;                               // 4t -> 4t..4t+3 (no carries: gaps of 3)
    } else if (SHARE == 8) {  // 4 bits -> each bit 8 times (r = 0): bit t to byte t, then * 0xFF
        u32 x = win & 0xFu;
        x = (x | (x << 14)) & 0x00030003u;             // bits 2..3 -> 16..17
        x = (x | (x << 7)) & 0x01010101u;              // bit t at 8t
        return x * 0xFFu;                              // 8t -> 8t..8t+7 (no carries)
    } else if (SHARE == 3) {  // 12 bits -> each bit 3 times from bit -r: bits 0..9 spread to 3t in a
                              // 32-bit word (bits 0..29 after * 7), bits 10..11 to 30..35 apart
        u32 x = win & 0x3FFu;
        x = (x | (x << 16)) & 0x030000FFu;             // bits 8..9 -> 24..25
        x = (x | (x << 8)) & 0x0300F00Fu;
        x = (x | (x << 4)) & 0x030C30C3u;
        x = (x | (x << 2)) & 0x09249249u;              // bit t at 3t
        const u32 h = (win >> 10) & 1u | ((win >> 8) & 8u);  // bits 10, 11 -> 0, 3
        return ((x * 7u) >> r) | ((h * 7u) << (30 - r));  // 3t -> 3t..3t+2 (no carries: gaps of 2)
    } else {  // k = 5, 6, 7: bit t to bit k*t of a 64-bit word, * (2^k - 1), drop the r
              // elements of group j0 that precede the chunk
        constexpr int NT = (32 + SHARE - 1 + SHARE - 1) / SHARE;  // groups touching the chunk (r <= k-1)
        u64 x = 0;
#pragma unroll
        for (int t = 0; t < NT; ++t) x |= (u64)((win >> t) & 1u) << (SHARE * t);  // bit t -> bit k*t
        x *= (u64)((1u << SHARE) - 1u);                // k*t -> k*t .. k*t+k-1 (no carries)
        return (u32)(x >> r);                          // element i = window element r + i
    }
}

#ifdef __CUDA_ARCH__
// Streaming loads of packed weights: read once, keep out of L1 (L1::no_allocate); L2 fetches the
// whole 256-byte block around each access from DRAM (L2::256B), whose other bytes the neighbouring
// lanes and warps read next (faster on an H100: docs/benchmarks.md, H100 tuning).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ uint2 ld_stream8(const void* p) {
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}
__device__ __forceinline__ u32 ld_stream4(const void* p) {
    u32 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(r) : "l"(p));
    return r;
}

// Pointers to chunk c (elements 32c .. 32c+31) of every plane of a row; unused planes cost nothing.
struct ChunkPtr {
    const u8* p8;
    const u8* p4;
    const u8* p2;
    const u8* p1;
    const u32* ps;  // shared formats: the row's shared plane (32-bit words)
    u32 c;          // shared formats: chunk index (the shared bits' position depends on it)
};

__device__ __forceinline__ ChunkPtr chunk_ptr(const u8* __restrict__ row, u32 kp, u32 c) {
    ChunkPtr p;
    p.ps = (const u32*)(row + offs(kp));      // shared plane: 4-byte aligned (8 when OWN is even)
    p.c = c;
    p.p8 = row + 32 * (size_t)c;              // 8-bit plane: 32 bytes per chunk
    p.p4 = row + off4(kp) + 16 * (size_t)c;   // 4-bit plane: 16 bytes per chunk
    p.p2 = row + off2(kp) + 8 * (size_t)c;    // 2-bit plane: 8 bytes per chunk
    p.p1 = row + off1(kp) + 4 * (size_t)c;    // 1-bit plane: 4 bytes per chunk
    return p;
}

__device__ __forceinline__ void advance(ChunkPtr& p, u32 chunks) {
    p.p8 += 32 * chunks;
    p.p4 += 16 * chunks;
    p.p2 += 8 * chunks;
    p.p1 += 4 * chunks;
    p.c += chunks;
}

// Shared formats: the raw shared-plane words of chunk p.c + i (cached loads of the small shared
// plane: neighbouring chunks of a warp read the same words).
__device__ __forceinline__ void load_shared(const ChunkPtr& p, int i, Chunk& ch) {
    if (!SHARED) { ch.sw[0] = 0u; return; }
    const u32 c = p.c + i;
    const u32 j0 = 32 * c / SHARE, j1 = (32 * c + 31) / SHARE;  // first and last group of the chunk
    ch.sw[0] = __ldg(p.ps + (j0 >> 5));
    if (!SHARE_POW2) ch.sw[SHARE_POW2 ? 0 : 1] = __ldg(p.ps + (j1 >> 5));
}

// Chunks p.c and p.c + 1 (p.c even): with k = 2, 4, 8 their 64/k bits lie in one word.
__device__ __forceinline__ void load_shared_pair(const ChunkPtr& p, Chunk& c0, Chunk& c1) {
    if (SHARE_POW2 && SHARED) {
        c0.sw[0] = c1.sw[0] = __ldg(p.ps + ((32 * p.c / SHARE) >> 5));  // bits 32c/k .. 32c/k + 64/k - 1
    } else {
        load_shared(p, 0, c0);
        load_shared(p, 1, c1);
    }
}

// Plane words and shared bits (PLANES_ONLY: not the shared bits) of chunk (p's chunk + i); i is a
// compile-time constant, so it becomes an immediate offset.
template <bool PLANES_ONLY = false>
__device__ __forceinline__ Chunk load_chunk_at(const ChunkPtr& p, int i) {
    Chunk ch;
    if (HAS8) {
        uint4 a = ld_stream16(p.p8 + 32 * i), b = ld_stream16(p.p8 + 32 * i + 16);
        ch.w8[0] = a.x; ch.w8[HAS8 ? 1 : 0] = a.y; ch.w8[HAS8 ? 2 : 0] = a.z; ch.w8[HAS8 ? 3 : 0] = a.w;
        ch.w8[HAS8 ? 4 : 0] = b.x; ch.w8[HAS8 ? 5 : 0] = b.y; ch.w8[HAS8 ? 6 : 0] = b.z; ch.w8[HAS8 ? 7 : 0] = b.w;
    }
    if (HAS4) {
        uint4 a = ld_stream16(p.p4 + 16 * i);
        ch.w4[0] = a.x; ch.w4[HAS4 ? 1 : 0] = a.y; ch.w4[HAS4 ? 2 : 0] = a.z; ch.w4[HAS4 ? 3 : 0] = a.w;
    }
    if (HAS2) {
        uint2 a = ld_stream8(p.p2 + 8 * i);
        ch.w2[0] = a.x; ch.w2[HAS2 ? 1 : 0] = a.y;
    }
    ch.w1 = HAS1 ? ld_stream4(p.p1 + 4 * i) : 0u;
    if (!PLANES_ONLY) load_shared(p, i, ch);
    return ch;
}

// Chunks (p's chunk + 0) and (+ 4) of a k = 4 format, p's chunk % 8 < 4: their shared bits are
// words c/4 and c/4 + 1 of the shared plane (c/4 even), one 8-byte load (gemv.cu SPREAD_PAIR) where
// the plane starts 8-byte aligned (offs = Kp*OWN/8 with Kp a multiple of 32: OWN even), else two.
__device__ __forceinline__ void load_chunk_spread(const ChunkPtr& p, Chunk& c0, Chunk& c4) {
    c0 = load_chunk_at<true>(p, 0);
    c4 = load_chunk_at<true>(p, 4);
    if (OWN % 2 == 0) {
        const uint2 w = __ldg((const uint2*)(p.ps + p.c / 4));
        c0.sw[0] = w.x;
        c4.sw[0] = w.y;
    } else {
        c0.sw[0] = __ldg(p.ps + p.c / 4);
        c4.sw[0] = __ldg(p.ps + p.c / 4 + 1);
    }
}

// Chunks (p's chunk + 0) and (+ 1) with the small planes read in one load each (the 2-bit plane
// of two chunks is 16 bytes, the 1-bit plane 8); p's chunk must be even (alignment).
__device__ __forceinline__ void load_chunk_pair(const ChunkPtr& p, Chunk& c0, Chunk& c1) {
    if (HAS8) {
        c0 = load_chunk_at(p, 0);
        c1 = load_chunk_at(p, 1);
        return;
    }
    if (HAS4) {
        uint4 a = ld_stream16(p.p4), b = ld_stream16(p.p4 + 16);
        c0.w4[0] = a.x; c0.w4[HAS4 ? 1 : 0] = a.y; c0.w4[HAS4 ? 2 : 0] = a.z; c0.w4[HAS4 ? 3 : 0] = a.w;
        c1.w4[0] = b.x; c1.w4[HAS4 ? 1 : 0] = b.y; c1.w4[HAS4 ? 2 : 0] = b.z; c1.w4[HAS4 ? 3 : 0] = b.w;
    }
    if (HAS2) {
        uint4 a = ld_stream16(p.p2);  // chunk 0: words x, y; chunk 1: z, w
        c0.w2[0] = a.x; c0.w2[HAS2 ? 1 : 0] = a.y;
        c1.w2[0] = a.z; c1.w2[HAS2 ? 1 : 0] = a.w;
    }
    if (HAS1) {
        uint2 a = ld_stream8(p.p1);   // chunk 0: x, chunk 1: y
        c0.w1 = a.x;
        c1.w1 = a.y;
    } else {
        c0.w1 = c1.w1 = 0u;
    }
    load_shared_pair(p, c0, c1);
}


// ------------------------------------------------------------------------- tile order (GPU copy)
// EXMY_TILE=1: the payload in tile order (cuda/gpu.py tile_order; unshared formats, Kp a multiple
// of 128, N of 16; not a file layout). The 16 rows of tile T = rows 16T .. 16T+15 lie together at
// byte 16 * stride * T, cut into blocks of 4 chunks (128 elements): block s holds, plane by plane
// (widest first), the 16 rows' 4 chunks of that plane, row after row. A GEMV warp's iteration then
// reads one contiguous block per 16-row tile (two at batch 1) instead of 64- or 128-byte runs of 16
// rows: faster on an H200 (docs/benchmarks.md). Same bytes, another order.
constexpr bool TILED = EXMY_TILE != 0;
static_assert(!TILED || !SHARED, "tile order: unshared formats");
constexpr u32 TB8 = HAS8 ? 64 * 32 : 0, TB4 = HAS4 ? 64 * 16 : 0, TB2 = HAS2 ? 64 * 8 : 0, TB1 = HAS1 ? 64 * 4 : 0;
constexpr u32 TBLK = TB8 + TB4 + TB2 + TB1;  // bytes of one block: 256 x bits

// Chunk c of row `rin` of the tile at `tile` (tile order).
__device__ __forceinline__ ChunkPtr chunk_ptr_tiled(const u8* __restrict__ tile, u32 rin, u32 c) {
    const u8* blk = tile + (size_t)(c >> 2) * TBLK;
    const u32 ci = c & 3;
    ChunkPtr p;
    p.ps = nullptr;
    p.c = c;
    p.p8 = blk + rin * 128 + ci * 32;
    p.p4 = blk + TB8 + rin * 64 + ci * 16;
    p.p2 = blk + TB8 + TB4 + rin * 32 + ci * 8;
    p.p1 = blk + TB8 + TB4 + TB2 + rin * 16 + ci * 4;
    return p;
}

// The same chunk 8 rows further down its tile (tile order): fixed offsets from p, so a warp keeps no
// pointers of its own for rows g + 8 and their loads take immediate offsets.
__device__ __forceinline__ ChunkPtr rows_below(const ChunkPtr& p) {
    ChunkPtr q = p;
    q.p8 += 8 * 128; q.p4 += 8 * 64; q.p2 += 8 * 32; q.p1 += 8 * 16;
    return q;
}

// p moved on by `bytes` in every plane (tile order: the same place in another tile).
__device__ __forceinline__ ChunkPtr offset_by(const ChunkPtr& p, u32 bytes) {
    ChunkPtr q = p;
    q.p8 += bytes; q.p4 += bytes; q.p2 += bytes; q.p1 += bytes;
    return q;
}

// A row: its start (row order) or its tile's start and its place in the tile (tile order).
struct RowRef {
    const u8* base;
    u32 rin;
};
__device__ __forceinline__ RowRef row_ref(const u8* payload, u32 r, u32 stride) {
    if (TILED) return {payload + (size_t)(r >> 4) * 16 * stride, r & 15};
    return {payload + (size_t)r * stride, 0};
}
__device__ __forceinline__ ChunkPtr chunk_at(const RowRef& r, u32 kp, u32 c) {
    return TILED ? chunk_ptr_tiled(r.base, r.rin, c) : chunk_ptr(r.base, kp, c);
}
// Plane words of chunk c of row r.
__device__ __forceinline__ Chunk load_chunk(const RowRef& r, u32 kp, u32 c) {
    return load_chunk_at(chunk_at(r, kp, c), 0);
}
// Move p on by `chunks` chunks of its row (tile order: a multiple of 4, whole blocks).
__device__ __forceinline__ void advance_by(ChunkPtr& p, u32 chunks) {
    if (TILED) {
        const size_t d = (size_t)(chunks >> 2) * TBLK;
        p.p8 += d; p.p4 += d; p.p2 += d; p.p1 += d; p.c += chunks;
    } else {
        advance(p, chunks);
    }
}
#endif

// Host/test helper: chunk c from a plain byte row (no alignment assumptions).
EXMY_HD Chunk chunk_from_bytes(const u8* row, u32 kp, u32 c) {
    Chunk ch;
    auto word = [&](u32 off) -> u32 {
        return (u32)row[off] | ((u32)row[off + 1] << 8) | ((u32)row[off + 2] << 16) | ((u32)row[off + 3] << 24);
    };
    if (HAS8) for (int j = 0; j < 8; ++j) ch.w8[HAS8 ? j : 0] = word(32 * c + 4 * j);
    if (HAS4) for (int j = 0; j < 4; ++j) ch.w4[HAS4 ? j : 0] = word(off4(kp) + 16 * c + 4 * j);
    if (HAS2) for (int j = 0; j < 2; ++j) ch.w2[HAS2 ? j : 0] = word(off2(kp) + 8 * c + 4 * j);
    ch.w1 = HAS1 ? word(off1(kp) + 4 * c) : 0u;
    const u32 j0 = 32 * c / SHARE, j1 = (32 * c + 31) / SHARE;  // first and last group of the chunk
    ch.sw[0] = SHARED ? word(offs(kp) + 4 * (j0 >> 5)) : 0u;
    if (!SHARE_POW2) ch.sw[SHARE_POW2 ? 0 : 1] = word(offs(kp) + 4 * (j1 >> 5));
    return ch;
}

// ------------------------------------------------------------------------- group sources

// Per-chunk byte transposes, computed once and shared by the 8 groups.
struct Pre {
    u32 t4[HAS4 && !NIB ? 4 : 1];  // t4[k] byte i = byte k of w4[i]: lo nibble = group 2k, hi nibble = group 2k+1
    u32 p2[HAS2 ? 2 : 1];  // p2[h] bytes = (w2[0].b[h], w2[0].b[h+2], w2[1].b[h], w2[1].b[h+2])
    u32 sm[NIB && SHARED ? 8 : 1];  // NIB shared: group e's m0 bits, byte i bit 0 (byte i = element
                                    // 8(e/2) + 2i + e%2 of the chunk)
    u32 ws;  // shared formats: bit i = shared m0 of element i of the chunk (like w1); NIB4: bit j =
             // m0 of elements 4j..4j+3; unshared: 0
};

// c: the chunk's index in its row (where its shared bits sit in Chunk.sw).
EXMY_HD Pre prepare(const Chunk& ch, u32 c) {
    Pre pre;
    pre.ws = SHARED ? expand_shared(ch.sw[0], ch.sw[SHARE_POW2 ? 0 : 1], c) : 0u;
    if (HAS4 && !NIB) {
        // 4x4 byte transpose of w4[0..3] in 8 PRMTs.
        const u32* w = ch.w4;
        u32 u0 = prmt(w[0], w[HAS4 ? 1 : 0], 0x5140);  // (w0.b0, w1.b0, w0.b1, w1.b1)
        u32 u1 = prmt(w[0], w[HAS4 ? 1 : 0], 0x7362);  // (w0.b2, w1.b2, w0.b3, w1.b3)
        u32 u2 = prmt(w[HAS4 ? 2 : 0], w[HAS4 ? 3 : 0], 0x5140);  // (w2.b0, w3.b0, w2.b1, w3.b1)
        u32 u3 = prmt(w[HAS4 ? 2 : 0], w[HAS4 ? 3 : 0], 0x7362);  // (w2.b2, w3.b2, w2.b3, w3.b3)
        pre.t4[0] = prmt(u0, u2, 0x5410);  // (w0.b0, w1.b0, w2.b0, w3.b0)
        pre.t4[HAS4 && !NIB ? 1 : 0] = prmt(u0, u2, 0x7632);  // (w0.b1, w1.b1, w2.b1, w3.b1)
        pre.t4[HAS4 && !NIB ? 2 : 0] = prmt(u1, u3, 0x5410);  // (w0.b2, ..., w3.b2)
        pre.t4[HAS4 && !NIB ? 3 : 0] = prmt(u1, u3, 0x7632);  // (w0.b3, ..., w3.b3)
    }
    if (NIB4) {
        // Group e = (j, h) = (e/2, e%2): bytes 0, 1 hold elements 8j+h, 8j+2+h (shared bit 2j of the
        // chunk), bytes 2, 3 elements 8j+4+h, 8j+6+h (bit 2j+1), for both h.
        const u32 s = pre.ws;                                    // bits 0..7
        u32 q = (s * 0x1001u) & 0x000F000Fu;                     // bits 0..3 stay, bits 4..7 -> 16..19
        q = (q * 0x41u) & 0x03030303u;                           // byte b = bits 2b, 2b+1 of s (at 0, 1)
        // byte b bit 0 = bit 2b (q0) / bit 2b+1 (q1). Pre.sm may keep other bits at byte bits 1..3
        // and 7 (SM_LOOSE): the byte-path decode overwrites those with the magnitude and the sign.
        const u32 q0 = SM_LOOSE ? q : q & 0x01010101u, q1 = SM_LOOSE ? q >> 1 : (q >> 1) & 0x01010101u;
#pragma unroll
        for (int j = 0; j < 4; ++j)                              // bytes 0,1 <- q0.b[j], bytes 2,3 <- q1.b[j]
            pre.sm[NIB && SHARED ? 2 * j : 0] = pre.sm[NIB && SHARED ? 2 * j + 1 : 0] =
                prmt(q0, q1, (u32)(j | (j << 4) | ((4 + j) << 8) | ((4 + j) << 12)));
    } else if (NIB && SHARED) {
        // Byte i of group e = element 8(e/2) + 2i + e%2: take bits 0, 2, 4, 6 of ws >> (8(e/2) + e%2)
        // and move bit 2i to bit 8i with one multiply (shifts 0, 6, 12, 18; the only overlapping
        // terms meet at bits 6, 12, 18 and carry into 7, 13, 19, all outside the mask).
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int i = NIB && SHARED ? e : 0;
            if ((SHARE & 1) == 0 && (e & 1)) {  // even k: elements 2m, 2m+1 share a bit (chunks start even)
                pre.sm[i] = pre.sm[NIB && SHARED ? e - 1 : 0];
                continue;
            }
            const u32 x = (pre.ws >> (8 * (e >> 1) + (e & 1))) & 0x55u;
            pre.sm[i] = (x * 0x41041u) & 0x01010101u;
        }
    }
    if (HAS2) {
        // Element e+8i's 2-bit field: i=0 -> w2[0] bits 2e, i=1 -> w2[0] bits 2e+16,
        // i=2 -> w2[1] bits 2e, i=3 -> w2[1] bits 2e+16. For e in 4h..4h+3 these sit in
        // bytes h and h+2 of w2[0] and w2[1], all at bit offset 2*(e&3).
        pre.p2[0] = prmt(ch.w2[0], ch.w2[HAS2 ? 1 : 0], 0x6420);  // (w0.b0, w0.b2, w1.b0, w1.b2)
        pre.p2[HAS2 ? 1 : 0] = prmt(ch.w2[0], ch.w2[HAS2 ? 1 : 0], 0x7531);  // (w0.b1, w0.b3, w1.b1, w1.b3)
    }
    return pre;
}

// Every plane hands over group e as a word whose byte i holds element e+8i's field at bit
// offset `o` of the byte (higher bits of the byte may hold other elements' fields: masked later).
//   4-bit: t4[e/2], o = 4*(e&1)      2-bit: p2[e/4], o = 2*(e&3)      1-bit: w1 itself, o = e
// (w1 byte i = elements 8i..8i+7, so element e+8i is bit e of byte i.) NIB formats: the 4-bit plane
// word w4[e/2] itself, o = 4*(e&1) (byte i = elements 8(e/2)+2i, +1), shared bits from Pre.sm.

// Place field bits [lo, lo+w) found at byte offset o to byte bit `dst`, all 4 bytes at once:
// shift by dst - o and keep the w bits starting at dst in each byte.
EXMY_HD u32 place(u32 src, int o, int dst, int w) {
    return shl(src, dst - o) & (((1u << w) - 1u) << dst) * 0x01010101u;
}

EXMY_HD u32 nibble_src(const Chunk& ch, const Pre& pre, int e) {
    return NIB ? ch.w4[HAS4 ? (e >> 1) : 0] : pre.t4[HAS4 && !NIB ? (e >> 1) : 0];
}

// Shared m0 of group e's four elements at byte bit `dst` (SM_LOOSE: other bits of the byte may be set).
EXMY_HD u32 shared_bits(const Chunk& ch, const Pre& pre, int e, int dst) {
    return NIB ? shl(pre.sm[NIB && SHARED ? e : 0], dst) : place(pre.ws, e, dst, 1);
}

// Bitwise select: bits of a where m is 1, bits of b elsewhere (one LOP3; spelled out for the device so
// that the compiler does not split it into a mask of b and an OR).
EXMY_HD u32 bitsel(u32 m, u32 a, u32 b) {
#ifdef __CUDA_ARCH__
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xE4;" : "=r"(d) : "r"(a), "r"(b), "r"(m));  // 0xE4 = c ? a : b (a=F0, b=CC, c=AA)
    return d;
#else
    return (a & m) | (b & ~m);
#endif
}

// Group e's codes, one per byte, code bit j at byte bit j (all formats but the 8-bit plane).
EXMY_HD u32 code_word(const Chunk& ch, const Pre& pre, int e) {
    u32 cw = 0;
    if (HAS4) cw |= place(nibble_src(ch, pre, e), 4 * (e & 1), LO4, 4);  // nibble -> code bits LO4+3..LO4
    if (HAS2) cw |= place(pre.p2[HAS2 ? (e >> 2) : 0], 2 * (e & 3), LO2, 2);  // 2-bit field -> bits LO2+1..LO2
    if (HAS1) cw |= place(ch.w1, e, LO1, 1);                                  // 1-bit field -> bit LO1
    if (SHARED) cw |= shared_bits(ch, pre, e, 0) & 0x01010101u;               // shared m0 -> bit 0
    return cw;
}

// Byte path (fp16 field, M <= 3, no 8-bit plane): group e straight into fp16 HIGH bytes
// [s | e4 e3 e2 e1 e0 | m9 m8]: sign (code bit BITS-1) -> byte bit 7, every other code bit j ->
// byte bit j + 2 - M (f lands in the low E exponent bits, the M mantissa bits at m9..; for M = 3
// code bit 0 would land at bit -1: it is f16_low_bytes' bit 7).
EXMY_HD u32 f16_high_bytes(const Chunk& ch, const Pre& pre, int e) {
    constexpr int D = BYTE_PATH ? 2 - M : 0;  // code bit j (below the sign) -> byte bit j + D
    // where the 2-bit field, the 1-bit plane and the shared m0 go (0 where M = 3 puts them at -1:
    // the field's bit 0, the 1-bit plane and m0 are then code bit 0, f16_low_bytes' business)
    constexpr int D2 = LO2 + D > 0 ? LO2 + D : 0, D1 = LO1 + D > 0 ? LO1 + D : 0, DS = D > 0 ? D : 0;
    u32 f = 0;
    if (HAS4) {
        u32 t = nibble_src(ch, pre, e);
        int o = 4 * (e & 1);
        constexpr u32 SIGN = 0x80808080u, MAG = (0x7u << (LO4 + D)) * 0x01010101u;
        if (NIB && SHARED) {  // shared m0 -> bit D first, then sign and magnitude over it (SM_LOOSE)
            f = bitsel(SIGN, shl(t, 7 - (o + 3)), shared_bits(ch, pre, e, D));
            f = bitsel(MAG, shl(t, LO4 + D - o), f);
        } else {
            f |= shl(t, 7 - (o + 3)) & SIGN;                          // nibble bit 3 = sign -> bit 7
            f |= shl(t, LO4 + D - o) & MAG;                           // nibble bits 2..0 -> LO4+D+2..LO4+D
        }
        if (HAS2 && LO2 + D >= 0) f |= place(pre.p2[HAS2 ? (e >> 2) : 0], 2 * (e & 3), D2, 2);  // 2-bit field
        if (HAS2 && LO2 + D < 0) f |= place(pre.p2[HAS2 ? (e >> 2) : 0], 2 * (e & 3) + 1, 0, 1);  // its bit 1 -> 0
        if (HAS1 && LO1 + D >= 0) f |= place(ch.w1, e, D1, 1);                                  // 1-bit field -> bit LO1+D
        if (SHARED && !NIB && D >= 0) f |= shared_bits(ch, pre, e, DS);                         // shared m0 -> bit D
    } else if (HAS2) {  // BITS 2 or 3: the 2-bit plane holds the sign
        u32 t = pre.p2[HAS2 ? (e >> 2) : 0];
        int o = 2 * (e & 3);
        f |= shl(t, 7 - (o + 1)) & 0x80808080u;                   // field bit 1 = sign -> bit 7
        f |= shl(t, D2 - o) & ((0x1u << D2) * 0x01010101u);        // field bit 0 (code bit LO2) -> LO2+D
        if (HAS1) f |= place(ch.w1, e, D1, 1);                    // 1-bit field -> bit LO1+D
        if (SHARED) f |= shared_bits(ch, pre, e, DS);             // shared m0 -> bit D
    }
    return f;
}

// Byte path with M = 3: code bit 0 of group e's elements at bit 7 of each byte, the fp16 LOW bytes
// (mantissa bit m7): the shared m0, the 1-bit plane (LO1 = 0) or bit 0 of the 2-bit field (LO2 = 0).
EXMY_HD u32 f16_low_bytes(const Chunk& ch, const Pre& pre, int e) {
    if (SHARED) return shared_bits(ch, pre, e, 7) & 0x80808080u;
    return HAS1 ? place(ch.w1, e, 7, 1) : place(pre.p2[HAS2 ? (e >> 2) : 0], 2 * (e & 3), 7, 1);
}

// Pair p = 2e+s as a "lane word": each 16-bit lane holds its element's code in its HIGH byte
// (bits 15..8; the low byte is don't-care, removed by the masks of to_field).
EXMY_HD u32 lane_word(const Chunk& ch, const Pre& pre, int e, int s) {
    if (HAS8) {
        int el = e + 16 * s;                  // lane 0 element; lane 1 is el+8 = 2 words further
        u32 b = (u32)(el & 3);                // byte inside w8[el/4]
        u32 sel = b | (b << 4) | ((4 + b) << 8) | ((4 + b) << 12);  // lane0 = a.b, lane1 = b.b (both bytes)
        return prmt(ch.w8[HAS8 ? (el >> 2) : 0], ch.w8[HAS8 ? ((el >> 2) + 2) : 0], sel);
    }
    u32 cw = code_word(ch, pre, e);           // bytes: codes of e, e+8, e+16, e+24
    return prmt(cw, cw, s ? 0x3322u : 0x1100u);  // s=0: lanes take bytes 0,1; s=1: bytes 2,3
}

// Lane word -> FIELD placement (F16: exponent field starts at bit 10; BF16: at bit 7):
//   sign: code bit BITS-1 (lane bit 8+BITS-1) -> bit 15
//   magnitude: code bits BITS-2..0 (lane bits 8+BITS-2..8) -> bits LOWM+BITS-2..LOWM, LOWM = EXP0-M
template <bool BF16>
EXMY_HD u32 to_field(u32 l) {
    constexpr int EXP0 = BF16 ? 7 : 10;       // lowest exponent bit of the 16-bit float
    constexpr int LOWM = EXP0 - M;            // where code bit 0 (lowest mantissa bit) goes
    constexpr u32 MAG = ((1u << (BITS - 1)) - 1u) << LOWM;  // E+M magnitude bits at their place
    return (shl(l, 8 - BITS) & 0x80008000u)   // sign bit of both lanes
         | (shl(l, LOWM - 8) & (MAG * 0x00010001u));  // exponent+mantissa bits of both lanes
}

// THE decode routine: group e of a chunk -> pairs 2e and 2e+1 as raw fp16 (BF16=false, needs
// E <= 4) or raw bf16 (BF16=true) words: value = v * 2^(bias-15) resp. v * 2^(bias-127).
template <bool BF16>
EXMY_HD void decode_group(const Chunk& ch, const Pre& pre, int e, u32& h0, u32& h1) {
    if (!BF16 && BYTE_PATH) {
        const u32 f = f16_high_bytes(ch, pre, e);
        const u32 l = M == 3 ? f16_low_bytes(ch, pre, e) : 0u;  // M <= 2: low bytes zero
        h0 = prmt(f, l, M == 3 ? 0x1504u : 0x1404u);  // lanes = (byte0 << 8 | low0, byte1 << 8 | low1)
        h1 = prmt(f, l, M == 3 ? 0x3726u : 0x3424u);  // lanes = (byte2 << 8 | low2, byte3 << 8 | low3)
    } else {
        h0 = to_field<BF16>(lane_word(ch, pre, e, 0));
        h1 = to_field<BF16>(lane_word(ch, pre, e, 1));
    }
}

// float32 multiply, round to nearest even, subnormal inputs and results KEPT. CuPy compiles
// RawModules with -ftz=true (appended after our options), which makes every compiler-emitted
// float32 instruction flush subnormals; the raw bf16-placement values of subnormal codes and
// tiny products are float32 subnormals, so every float32 multiply on a value path uses this.
EXMY_HD float fmul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));  // no .ftz: IEEE subnormals
    return r;
#else
    return a * b;
#endif
}

// Exact float32 value of the raw bf16-placement lane (lane 0 or 1): bits -> fp32 via << 16.
EXMY_HD u32 bf16_lane_bits(u32 h, int lane) { return lane ? (h & 0xFFFF0000u) : (h << 16); }

// 2^(127 - BIAS) and 2^(15 - BIAS) as float bit patterns (exponent field 127 + n).
constexpr u32 POW2_127_BITS = (u32)(127 + 127 - BIAS) << 23;
constexpr u32 POW2_15_BITS = (u32)(127 + 15 - BIAS) << 23;
// 2^(15 - BIAS) as an fp16 bit pattern, both lanes (exponent field 15 + 15 - BIAS <= 30 for E <= 4).
constexpr u32 POW2_15_H2 = F16_OK ? ((u32)(15 + 15 - BIAS) << 10) * 0x00010001u : 0u;
// 2^(127 - BIAS) as a bf16 bit pattern, both lanes (exponent field 127 + 127 - BIAS <= 254).
constexpr u32 POW2_127_B2 = ((u32)(127 + 127 - BIAS) << 7) * 0x00010001u;

}  // namespace exmy
