// gemv.cu - fused dequant + GEMV / small-batch GEMM: y[b, n] = sum_k x[b, k] * W[n, k], batch 1..16.
//
// Each packed weight is read from memory once and decoded in registers (exmy_decode.cuh) straight
// into tensor-core operands: mma.sync m16n8k16 with the weights as A (16 rows x 16 k) and x as B
// (16 k x 8 batch columns), float32 accumulators.
//
// Work split. A warp owns a tile of 16 weight rows and a contiguous K slice; a block of WARPS warps
// holds WARPS/split tiles x `split` slices (the host picks split in 1,2,4,8 so that about one wave
// of warps covers the GPU and every warp runs a long loop). Iteration `it` of a warp covers chunks
// it*KSTEP .. it*KSTEP+KSTEP-1 (32 elements each); lane (g = lane/4, t = lane%4) loads CPT
// consecutive chunks (or chunks t, t+4: Cfg::SPREAD) of rows g and g+8 (for e2m2 16 B of the
// 4-bit plane + 4 B of the 1-bit plane per chunk: the 4 lanes of a row read 64*CPT contiguous
// bytes), prefetching the next iteration,
// and the same chunks of x for batch rows g (and g+8 when NT = 2; b1r: from a per-warp window in
// shared memory that is refilled one iteration ahead, Cfg::XWIN). Slices meet in shared memory;
// y is rounded once to the output type.
//
// k permutation. The sum over k does not care about order, so within its 32-element chunk a lane
// feeds decoded pair p (elements pair_elem(p,0), pair_elem(p,1)) to k16-step e = p/2 at A slot
// a0/a1 (p even) or a2/a3 (p odd), and feeds x's pair of the same two elements to b0 / b1: the mma
// fragment layout puts a_j and b_j of one lane at the same k, so every product pairs the right x
// with the right weight. Decoding never moves bits across lanes.
//
// Weight value per MODE (the weights the mma sees equal QTensor.dequantize("F16"/"BF16")):
//   MODE 0 (fp16 fold):  w = h * S, h = raw fp16 field = v*2^(bias-15), S = fp16(scale*2^(15-bias))
//                        (host-checked to be finite): one HMUL2, exact product, one rounding.
//   MODE 1 (fp16 2-step): w = (h * 2^(15-bias)) * scale: first multiply exact, one rounding.
//   MODE 2 (bf16):       w = bf16_rn((float(h_bf16) * 2^(127-bias)) * scale), float32 products exact.
//   MODE 3 (bf16 row):   one scale per row only: w = h_bf16 * 2^(127-bias) = v, the code's value itself
//                        (one exact bf16x2 multiply; the raw field may be subnormal, v never is), and
//                        the float32 sums are multiplied by the row's scale, as MODE 0/1 do in fp16.
//                        Per pair one instruction instead of MODE 2's five: bf16 models' fast path
//                        (the host takes it for bf16 x and E <= 4 at batch 2..16 on smaller layers; tested bit-exact).
//   MODE 4 (bf16 x, fp16 operands; b1 / b1r, one scale per row): x is used as fp16 numbers
//                        x * 2^s, s a power of two chosen from the block's largest |x| (stage_x), so that the
//                        weights take MODE 0/1's free fp16 decode; the float32 sums are multiplied by
//                        scale * 2^(15-bias) * 2^-s. Products and sums are MODE 3's scaled by a power of
//                        two, so y is MODE 3's bit for bit unless an |x| is below 2^-29 of the largest
//                        (it rounds in fp16; a contribution far below y's bf16 rounding). The host takes it
//                        for bf16 x and E <= 4 at batch 1.
//   MODE 5 (bf16 x, fp16 operands; one scale per row): MODE 4 with the conversion done before the
//                        GEMV, once per launch, by exmy_x_tiles: x arrives as x tiles of fp16 numbers
//                        x * 2^s_b, s_b chosen from row b's largest |x|, and after the tiles (at byte
//                        x_tile_factors) the float 2^-s_b of each row. The weights take the free fp16
//                        decode, and the sums of column b are multiplied by scale * 2^(15-bias) * 2^-s_b:
//                        MODE 3's bits under MODE 4's condition, per row. The host takes it for bf16 x and
//                        E <= 4 at batch 2..16 on large layers (cuda/gpu.py X16_MIN_WEIGHTS: the second
//                        kernel costs a fixed time), where a pass over x in every block (MODE 4) cost more
//                        than it saved.
// x of the other 16-bit type is converted once per load (MODE 2 with fp16 x: x rounded to bf16).
//
// One kernel template, exmy_gemv<KIND, MODE, XF16, GM, BLOCKS, XT> (at the end); the host picks the
// instantiation and compiles it alone (cuda/gpu.py GemvKernel). Compile with -DEXMY_E, -DEXMY_M
// (and optionally -DEXMY_SHARE, -DGEMV_WARPS, -DGEMV_XWIN, -DGEMV_CPT, -DGEMV_PP, -DGEMV_L2PF, -DGEMV_WARM; -DGEMV_DIAG builds
// knock-outs for timing where there are no hardware counters: scripts/sweep-gemv-kinds --variants
// nox:GEMV_DIAG=1).
#include "exmy_decode.cuh"

using namespace exmy;

#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#ifndef GEMV_XWIN
#define GEMV_XWIN 1  // 0: b1r reads x straight from global memory (the GPU tests compare both)
#endif
#ifndef GEMV_DIAG
#define GEMV_DIAG 0  // timing only, results wrong: main-loop stages left out (1 x loads, 2 decode, 4 mma)
#endif
#ifndef GEMV_CPT
#define GEMV_CPT 0  // 0: 2 chunks per lane and iteration for batch <= 8 and codes <= 6 bits, else 1
#endif
#ifndef GEMV_PP
#define GEMV_PP 0  // 0: the tuned choice of two alternating register sets (Cfg::PP); 1 always, -1 never
#endif
#ifndef GEMV_L2PF
#define GEMV_L2PF 0  // tile order: D > 0 prefetches each warp's weights D iterations beyond the register
                     // prefetch into L2 (one bulk prefetch per 16-row tile and iteration); 0 off (timing)
#endif
#ifndef GEMV_WARM
#define GEMV_WARM -1  // tile order, x tiles: W > 0 puts each warp's main-loop iterations 2 .. W+1 into L2 first thing;
                      // 0 never; -1 the tuned choice
#endif

namespace {

constexpr int WARPS = GEMV_WARPS;
// Kernel kinds: 0 = "b1" (batch 1, x staged once per block in shared memory, already permuted;
// for K up to ~13 000), 3 = "b1r" (batch 1, larger K: x from global memory, more registers),
// 1 = "nt1" (batch 1..8), 2 = "nt2" (batch 9..16, two 8-column mma tiles), 4 = "nt2w" / 5 = "nt1w" (nt2 / nt1 with
// two 16-row tiles per warp). NT: mma column tiles; MT: mma row tiles per warp; XS: x staged in shared memory; CPT: consecutive chunks per lane per
// iteration (2 for batch 1 with codes <= 6 bits: more weights in flight; elsewhere the registers
// go to x); KSTEP: chunks per warp iteration (the 4 lanes t = 0..3 of a row). BLOCKS: blocks per
// SM the kernel's registers are sized for (2: 128 registers, 3: 80).
template <int KIND, int BLOCKS>
struct Cfg {
    static constexpr int NT = KIND == 2 || KIND == 4 ? 2 : 1;
    // MT: 16-row tiles per warp, sharing each x fragment (nt2w). With one tile, batch 16 moves x
    // through L1 at 3.2 bytes per byte of e2m2 weights, and L1 was the busiest unit (88 %, ncu on an
    // H200); two tiles halve that, at the price of half as many warps (the host takes nt2w only for
    // layers with rows enough to fill the GPU: cuda/gpu.py gemv_wide).
    // nt1w: the same for batch 2..8 (one column tile, x re-read per row tile just as often).
    static constexpr int MT = KIND == 4 || KIND == 5 ? 2 : 1;
    static constexpr bool XS = KIND == 0;
    static constexpr int CPT = GEMV_CPT > 0 ? GEMV_CPT : (((KIND == 0 || KIND == 3) && BITS <= 6) ? 2 : 1);
    static constexpr int KSTEP = 4 * CPT;
    // Chunk order: lane t takes chunks t*CPT .. t*CPT+CPT-1 of an iteration (the small planes of
    // a chunk pair in one load), or with SPREAD chunks t, t+4, ... (each 16-byte load instruction
    // of the 4-bit plane then covers whole 32-byte sectors: faster for b1r when there is no 2- or
    // 8-bit plane on most layer shapes measured on an H100; slower for b1, whose x comes from
    // shared memory; docs/benchmarks.md, H100 tuning). Not in tile order, where a lane's two chunks
    // are 32 contiguous bytes anyway (spread, they lie in two blocks: e2m1 28672->8192 11 % slower, H200).
    static constexpr bool SPREAD = !TILED && KIND == 3 && CPT > 1 && !HAS2 && !HAS8;
    // PP: the main loop alternates two register sets (ping-pong) instead of copying the prefetched
    // set each iteration: b1r in its 128-register build, b1 and nt1 for unshared codes of other than
    // 5 bits (5-bit nt1 gained little, and spills in its 80-register bf16 build), nt2 for unshared
    // codes, nt1w / nt2w for unshared 4-bit codes (the two row tiles' second set fits there), and
    // nt2w for unshared 5-bit codes in tile order (rows_below freed the registers: 5-7.5 % faster at
    // batch 16 on an H100; row order spills, and 6-bit codes were level or 5 % slower). XWIN: the x
    // of the next iteration is loaded with its weights (16 bytes per lane) and parked in the warp's
    // window in shared memory as pair words (park_x), so an iteration reads x like b1 does: b1r with
    // a 1-bit plane or shared bits. Where they are off they were slower on an H100
    // (docs/benchmarks.md, H100 tuning and fourteenth session). With one set, ptxas may issue the
    // prefetch late, into registers the iteration's first chunk is still decoded from
    // (docs/kernels.md); -DGEMV_PP=1 gives every kind two sets, -DGEMV_PP=-1 none, for timing.
    static constexpr bool PP = GEMV_PP ? GEMV_PP > 0
                                       : (KIND == 3 && BLOCKS == 2) || (KIND == 0 && !SHARED && BITS != 5) ||
                                             (KIND == 2 && !SHARED) || (KIND == 1 && !SHARED && BITS != 5) ||
                                             ((KIND == 4 || KIND == 5) && NIB && !SHARED) ||
                                             (KIND == 4 && TILED && BITS == 5 && !SHARED);
    static constexpr bool XWIN = KIND == 3 && GEMV_XWIN && CPT == 2 && (HAS1 || SHARED);
};
constexpr int XS_STRIDE = 20;  // words per chunk of staged x: 16 pairs + 4 padding (conflict-free LDS.128)

// Programmatic dependent launch (src/exmyconv/cuda/launch.py; no-ops for a plain launch). pdl_wait:
// until the previous kernel of the stream has finished and its writes are visible (x may be its
// output). pdl_release: the next kernel may start launching (it waits for this one to finish
// before touching y). Every kernel here releases only after its wait, so at most two grids of a
// stream run at once: releasing first let three run, and CUDA-graph replays of a decoder went
// wrong (docs/kernels.md).
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <int V>
struct Int { static constexpr int value = V; };  // a compile-time index passed to generic lambdas

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));  // IEEE fp16 multiply, subnormals kept
    return r;
}

// bf16x2 multiply, exact for a power-of-two factor (subnormal inputs kept); fma with -0 so that
// -0 stays -0 (sm_80 has bf16x2 fma, not mul).
__device__ __forceinline__ u32 bmul2(u32 a, u32 b) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
    return r;
}

__device__ __forceinline__ u32 bf16x2_rn(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // lo -> bits 15..0
    return r;
}

// fp16x2 word -> bf16x2 word (each lane rounded to nearest even).
__device__ __forceinline__ u32 f16x2_to_bf16x2(u32 h) {
    float lo, hi;
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((u16)(h & 0xFFFFu)));  // lane 0 = bits 15..0
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((u16)(h >> 16)));      // lane 1 = bits 31..16
    return bf16x2_rn(lo, hi);
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (BF16)
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The 16 words of one chunk of x from shared memory (four LDS.128; src 16-byte aligned).
__device__ __forceinline__ void lds_chunk(u32 (&w)[16], const u32* src) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        const uint4 r = ((const uint4*)src)[v];
        w[4 * v] = r.x; w[4 * v + 1] = r.y; w[4 * v + 2] = r.z; w[4 * v + 3] = r.w;
    }
}

__device__ __forceinline__ uint4 ld_x16(const u16* p) {
    uint4 r;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// Scale of one row for one group, in the form MODE multiplies by (fp16 bits or float32).
template <int MODE>
struct ScaleT { typedef u32 type; };
template <>
struct ScaleT<2> { typedef float type; };
template <>
struct ScaleT<3> { typedef float type; };
template <>
struct ScaleT<4> { typedef float type; };
template <>
struct ScaleT<5> { typedef float type; };

template <int MODE>
__device__ __forceinline__ typename ScaleT<MODE>::type load_scale(const void* ks, size_t i) {
    if constexpr (MODE >= 2) return ((const float*)ks)[i];
    else return ((const u16*)ks)[i] * 0x00010001u;  // fp16 bits in both lanes
}

// Apply the MODE's scaling to a raw pair (lanes may carry different scales s0/s1 only on the
// unaligned-group path; otherwise s0 == s1).
template <int MODE>
__device__ __forceinline__ u32 scale_pair(u32 h, typename ScaleT<MODE>::type s0, typename ScaleT<MODE>::type s1) {
    if constexpr (MODE == 0) {
        return hmul2(h, (s0 & 0xFFFFu) | (s1 & 0xFFFF0000u));  // lane-wise S (bits 15..0 from s0, 31..16 from s1)
    } else if constexpr (MODE == 1) {
        return hmul2(hmul2(h, POW2_15_H2), (s0 & 0xFFFFu) | (s1 & 0xFFFF0000u));  // exact *2^(15-bias), then *scale
    } else {
        const float p127 = __uint_as_float(POW2_127_BITS);
        // (exact v) * scale, exact in fp32; fmul_rn keeps subnormals (CuPy compiles with -ftz=true)
        float lo = fmul_rn(fmul_rn(__uint_as_float(bf16_lane_bits(h, 0)), p127), s0);
        float hi = fmul_rn(fmul_rn(__uint_as_float(bf16_lane_bits(h, 1)), p127), s1);
        return bf16x2_rn(lo, hi);
    }
}

// MODE 4: bf16x2 word -> fp16x2 word of both lanes times `pow2` (a power of two: exact in float32;
// rounded to fp16 only below fp16's normal range).
__device__ __forceinline__ u32 bf16x2_to_f16x2_times(u32 w, float pow2) {
    const float lo = fmul_rn(__uint_as_float(w << 16), pow2), hi = fmul_rn(__uint_as_float(w & 0xFFFF0000u), pow2);
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // lo -> bits 15..0
    return r;
}

// MODE 4 / 5: s = 14 - exponent of the largest |x| (given as bf16 magnitude bits), so that every
// x * 2^s is below 2^15 (fp16 holds up to 65504) and the largest keeps fp16's 11 bits; 127 for zeros
// and bf16 subnormals, >= -114 (inf and NaN stay what they are).
__device__ __forceinline__ int x16_shift(u32 maxbits) {
    const int ex = (int)(maxbits >> 7);  // bf16 exponent field: 0 (zero / subnormal) .. 255 (inf, NaN)
    return ex == 0 ? 127 : min(127, 141 - ex);
}
__device__ __forceinline__ float pow2f(int s) { return __uint_as_float((u32)(127 + s) << 23); }  // 2^s, s in -126..127
// 2^-s: normal for s <= 126; 2^-127 is a float32 subnormal
__device__ __forceinline__ float unpow2f(int s) {
    return s == 127 ? __uint_as_float(0x00400000u) : __uint_as_float((u32)(127 - s) << 23);
}
// x tiles (XT; written by exmy_x_tiles): x of batch rows 0 .. 8*nt-1 in the order the batch 2..16 kinds
// take it, so that each 16-byte x load of a warp reads 512 consecutive bytes (4 cache lines; from x's
// rows it touches 16). Per iteration of 4 chunks (128 elements) and per 8 batch rows (an mma column
// tile j) a 2 KB block; in it, lane (g, t)'s 16 pair words of chunk 4i + t, batch row 8j + g, in the
// mma's pair order (pair p = elements pair_elem(p, 0), pair_elem(p, 1)), as four 16-byte words v =
// 0..3 (pairs 4v .. 4v+3) 512 bytes apart. Rows past the batch and elements past K are zeros.
// x_tile_word: the 32-bit word of chunk q, batch row b where its pairs 0..3 start.
__device__ __forceinline__ size_t x_tile_word(u32 q, u32 b, u32 nt) {
    return ((size_t)(q >> 2) * nt + (b >> 3)) * 512 + ((b & 7) * 4 + (q & 3)) * 4;
}
// MODE 5: where exmy_x_tiles puts the rows' factors 2^-s_b (a float per batch row), in bytes after the tiles
__device__ __forceinline__ size_t x_tile_factors(u32 k, u32 nt) { return (size_t)((k + 127) / 128) * nt * 2048; }

__device__ __forceinline__ float f16_to_f32(u32 bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)bits));  // exact widening
    return f;
}

// XWIN: park a lane's 16 bytes of x (elements 8t..8t+7 of chunk c = lane/4, t = lane%4) in the
// warp's window as pair words in the order the mma takes them (like the b1 staging): pair p of
// chunk c at word c*XS_STRIDE + p, converted to the operand type. Lane t writes pairs 4t..4t+3.
// NIB order (pairs of elements 2 apart inside one quarter) needs only the lane's own words; the
// general order (pair 2e = elements (e, e+8), 2e+1 = (e+16, e+24)) takes word t of each of the
// 4 lanes of the chunk, exchanged through `raw` (the warp's second window, same layout).
// Call with the whole warp; the window may be read after it returns.
// X16S (MODE 4): bf16 x parked as fp16 times xpow.
template <bool BF, bool XF16, bool X16S = false>
__device__ __forceinline__ void park_x(uint4 v, u32 lane, u32* win, u32* raw, float xpow = 1.f) {
    const u32 c = lane >> 2, t = lane & 3;
    u32 w[4];
    if (NIB) {  // pairs 4t + j = (x0,x2), (x4,x6), (x1,x3), (x5,x7) of the lane's elements
        w[0] = prmt(v.x, v.y, 0x5410u); w[1] = prmt(v.z, v.w, 0x5410u);  // low halves of both words
        w[2] = prmt(v.x, v.y, 0x7632u); w[3] = prmt(v.z, v.w, 0x7632u);  // high halves of both words
        __syncwarp();  // every lane is done with the previous window
    } else {
        *(uint4*)(raw + c * XS_STRIDE + 4 * t) = v;
        __syncwarp();  // raw complete; every lane is done with the previous window
        const u32* r = raw + c * XS_STRIDE + t;  // word t of lane j: elements 8j + 2t, 8j + 2t + 1
        const u32 a = r[0], b = r[4], d = r[8], e = r[12];
        w[0] = prmt(a, b, 0x5410u);  // pair 4t:     (x[2t],     x[2t + 8])
        w[1] = prmt(d, e, 0x5410u);  // pair 4t + 1: (x[2t + 16], x[2t + 24])
        w[2] = prmt(a, b, 0x7632u);  // pair 4t + 2: (x[2t + 1],  x[2t + 9])
        w[3] = prmt(d, e, 0x7632u);  // pair 4t + 3: (x[2t + 17], x[2t + 25])
    }
    if (BF && XF16) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = f16x2_to_bf16x2(w[i]);
    }
    if (X16S) {
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = bf16x2_to_f16x2_times(w[i], xpow);
    }
    *(uint4*)(win + c * XS_STRIDE + 4 * t) = make_uint4(w[0], w[1], w[2], w[3]);
    __syncwarp();
}

// One warp = MT 16-row tiles x one K slice: iterations it0, it0+istep, ... < it1 of KSTEP chunks.
// GM: 0 = one scale per row, 1 = scale groups aligned to chunks, 2 = not aligned (per element).
// With fp16 operands and one scale per row the mma multiplies the raw decoded values
// (v * 2^(bias-15), exact in fp16) and the float32 result is scaled once at the end (EPI).
template <int KIND, int MODE, bool XF16, int GM, int BLOCKS, bool XT>
__device__ __forceinline__ void gemv_warp(const u8* __restrict__ payload, const void* __restrict__ ks,
                                          const u16* __restrict__ x, const u32* __restrict__ xs, u32 n, u32 k,
                                          u32 stride, u32 ngroups, u32 g, int gshift, u32 batch,
                                          u32 row0, u32 it0, u32 it1, u32 istep,
                                          float (&acc)[Cfg<KIND, BLOCKS>::MT][Cfg<KIND, BLOCKS>::NT][4]) {
    typedef Cfg<KIND, BLOCKS> C;
    constexpr int NT = C::NT, CPT = C::CPT, KSTEP = C::KSTEP, MT = C::MT;
    constexpr bool XS = C::XS, SPREAD = C::SPREAD, XWIN = C::XWIN, PP = C::PP;
    constexpr u32 CSTEP = SPREAD ? 4 : 1;       // chunks between a lane's chunks of one iteration
    // chunks t, t+4 of k = 4 formats: their shared words in one load (load_chunk_spread); not in the
    // 80-register build of b1r, where that was slower on an H100 (docs/benchmarks.md, H100 tuning)
    constexpr bool SPREAD_PAIR = SPREAD && CPT == 2 && SHARE == 4 && PP;
    constexpr bool BF = MODE == 2 || MODE == 3;  // tensor-core operand type
    constexpr bool EPI = GM == 0 && MODE != 2;  // scale after the mma (one scale per row, MODE 0, 1, 3, 4, 5)
    static_assert(MODE != 3 || GM == 0, "MODE 3 is for one scale per row");
    static_assert(MODE != 5 || (GM == 0 && !XF16), "MODE 5 is for bf16 models (x given as scaled fp16) and one scale per row");
    static_assert(MODE != 4 || (GM == 0 && (KIND == 0 || KIND == 3) && !XF16),
                  "MODE 4 is b1 / b1r with bf16 x and one scale per row");
    static_assert(!XT || (KIND != 0 && KIND != 3 && KSTEP == 4 && MODE != 4),
                  "x tiles: the batch 2..16 kinds (MODE 4 is batch 1's)");
    static_assert(MODE != 5 || XT, "MODE 5 takes x from exmy_x_tiles");
    typedef typename ScaleT<MODE>::type S;
    const u32 lane = threadIdx.x & 31;
    const u32 gr = lane >> 2, t = lane & 3;     // mma groupID / thread-in-group
    // rows gr and gr + 8 of tile m (rows row0 + 16m ..); clamped: tail rows re-read row n-1 (their
    // outputs are not written). Tile order (N a multiple of 16): a tile past N re-reads the last
    // tile, so that rows gr + 8 are always 8 rows below rows gr in the same tile (rows_below).
    u32 ra[MT], rb[MT];
    RowRef rowa[MT], rowb[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const u32 r = row0 + 16 * m + gr;
        if (TILED) {
            ra[m] = (row0 + 16 * m < n ? row0 + 16 * m : n - 16) + gr;
            rb[m] = ra[m] + 8;
        } else {
            ra[m] = r < n ? r : n - 1;
            rb[m] = r + 8 < n ? r + 8 : n - 1;
        }
        rowa[m] = row_ref(payload, ra[m], stride);
        rowb[m] = row_ref(payload, rb[m], stride);
    }
#if __CUDA_ARCH__ >= 900
    // WARM: iterations a warp puts into L2 (bulk prefetches, no registers) before anything else, in tile order,
    // for a kind with x tiles: it waits for their kernel before its loop with one iteration's weights in
    // flight, and the warm-up streams more through that wait. Taken in MODE 5, whose tiles kernel takes
    // longest (each block reads its whole row of bf16 x first): 1-2.5 % faster at batch 4-16 on an H100;
    // with fp16 x level to 3 % slower, and the two-tile kinds with two register sets took more instructions
    // per loop with it (ptxas at 128 registers; docs/benchmarks.md, twenty-fifth session).
    constexpr int WARM = !TILED ? 0 : GEMV_WARM >= 0 ? GEMV_WARM : (MODE == 5 && (MT == 1 || !C::PP)) ? 1 : 0;
    if constexpr (WARM > 0 && XT) {  // (the main loop's bound: main_end below)
        const u32 wend = (k % 8) == 0 ? min(it1, (k / 32) / KSTEP) : 0;
        if (lane == 0) {
#pragma unroll
            for (int d = 1; d <= WARM; ++d) {
#pragma unroll
                for (int m = 0; m < MT; ++m)
                    if (it0 + d * istep < wend)
                        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;"
                                     ::"l"(rowa[m].base + (size_t)(it0 + d * istep) * CPT * TBLK), "r"((u32)(CPT * TBLK)) : "memory");
            }
        }
    }
#endif
    const u32 kp = padded_k(k);  // padded row length; stride: bytes between rows, a multiple of 16
    const u32 nq = (k + 31) / 32;               // chunks holding real elements
    const bool xvec = (k % 8) == 0;             // x rows 16-byte aligned
    // x rows of this lane's B-fragment columns; columns >= batch re-read row batch-1 and are
    // never written out, so no lane needs a zero path (no divergence).
    const u16* xr[NT];
#pragma unroll
    for (int j = 0; j < NT; ++j) xr[j] = x + (size_t)(gr + 8 * j < batch ? gr + 8 * j : batch - 1) * k;

    // One scale per row: loaded once.
    S rsa[MT], rsb[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        rsa[m] = GM == 0 ? load_scale<MODE>(ks, (size_t)ra[m] * ngroups) : S{};
        rsb[m] = GM == 0 ? load_scale<MODE>(ks, (size_t)rb[m] * ngroups) : S{};
    }

    // XWIN: this warp's x window (dynamic shared memory: the window, then its raw exchange area)
    // and the first chunk it holds
    u32* const xwin = const_cast<u32*>(xs) + (threadIdx.x >> 5) * (2 * KSTEP * XS_STRIDE);
    u32 xbase = 0;
    float xpow = 1.f, xunpow = 1.f;  // MODE 4: x is used times xpow = 2^s, the sums get xunpow = 2^-s (stage_x)
    // x words of chunk q: xw[j][w] = (x[2w], x[2w+1]) of row xr[j]; `checked`: may be the K tail.
    auto load_x = [&](u32 (&xw)[NT][16], u32 q, bool checked) {
        // staged pair words, already in the operand type: b1's whole x (pair p of chunk q at
        // xs[q * XS_STRIDE + p], zeros past K) or, in the b1r main loop, the warp's window
        if (XS || (XWIN && !checked)) {
            lds_chunk(xw[0], XS ? xs + q * XS_STRIDE : xwin + (q - xbase) * XS_STRIDE);
            return;
        }
        if (XT) {  // x tiles: pair words in order, zeros past K and the batch (no checks, no clamps)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    const uint4 r = ld_x16((const u16*)((const u32*)x + x_tile_word(q, gr + 8 * j, NT) + 128 * v));
                    xw[j][4 * v] = r.x; xw[j][4 * v + 1] = r.y; xw[j][4 * v + 2] = r.z; xw[j][4 * v + 3] = r.w;
                }
            return;
        }
        const u32 qx = q < nq ? q : nq - 1;  // past K the weights are zero: any finite x will do
        if (!checked || (xvec && 32 * qx + 32 <= k)) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    uint4 r = ld_x16(xr[j] + 32 * qx + 8 * v);
                    xw[j][4 * v] = r.x; xw[j][4 * v + 1] = r.y; xw[j][4 * v + 2] = r.z; xw[j][4 * v + 3] = r.w;
                }
        } else {  // tail of K (or rows not 16-byte aligned): element-wise, zeros past K
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int w = 0; w < 16; ++w) {
                    const u32 e0 = 32 * qx + 2 * w;
                    const u32 lo = e0 < k ? xr[j][e0] : 0u, hi = e0 + 1 < k ? xr[j][e0 + 1] : 0u;
                    xw[j][w] = lo | (hi << 16);  // lane 0 = bits 15..0
                }
        }
        if (BF && XF16) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int w = 0; w < 16; ++w) xw[j][w] = f16x2_to_bf16x2(xw[j][w]);
        }
        if constexpr (MODE == 4) {
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int w = 0; w < 16; ++w) xw[j][w] = bf16x2_to_f16x2_times(xw[j][w], xpow);
        }
    };

    // Decode + scale + mma of chunk q of rows ra[m] / rb[m], every tile m (one x fragment for all).
    auto compute = [&](const Chunk (&wa)[MT], const Chunk (&wb)[MT], const S (&s_a)[MT], const S (&s_b)[MT],
                       u32 q, bool checked) {
        u32 xw[NT][16];
        if (GEMV_DIAG & 1) {  // knock-out: x made up in registers
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int w = 0; w < 16; ++w) xw[j][w] = (q + w + j) * 0x00010001u;
        } else {
            load_x(xw, q, checked);
        }
        Pre prea[MT], preb[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {  // shared bits expanded here, not at load
            prea[m] = prepare(wa[m], q);
            preb[m] = prepare(wb[m], q);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            u32 a[MT][4];
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                u32 &a0 = a[m][0], &a1 = a[m][1], &a2 = a[m][2], &a3 = a[m][3];
                if (GEMV_DIAG & 2) {  // knock-out: raw plane words instead of decoded pairs
                    a0 = wa[m].w4[(e >> 1) & (HAS4 ? 3 : 0)] ^ e; a2 = wa[m].w1 + e;
                    a1 = wb[m].w4[(e >> 1) & (HAS4 ? 3 : 0)] ^ e; a3 = wb[m].w1 + e;
                } else {
                    decode_group<BF>(wa[m], prea[m], e, a0, a2);  // row gr:   pairs 2e (k slots 2t,2t+1), 2e+1 (2t+8,2t+9)
                    decode_group<BF>(wb[m], preb[m], e, a1, a3);  // row gr+8: same pairs
                }
                if (EPI) {
                    // raw values; the row scale is applied to the float32 sums
                    if constexpr (MODE == 3) {  // bf16 raw field * 2^(127-bias): the code's value, exact
                        a0 = bmul2(a0, POW2_127_B2); a2 = bmul2(a2, POW2_127_B2);
                        a1 = bmul2(a1, POW2_127_B2); a3 = bmul2(a3, POW2_127_B2);
                    }
                } else if (GM == 0) {
                    a0 = scale_pair<MODE>(a0, rsa[m], rsa[m]); a2 = scale_pair<MODE>(a2, rsa[m], rsa[m]);
                    a1 = scale_pair<MODE>(a1, rsb[m], rsb[m]); a3 = scale_pair<MODE>(a3, rsb[m], rsb[m]);
                } else if (GM == 1) {
                    a0 = scale_pair<MODE>(a0, s_a[m], s_a[m]); a2 = scale_pair<MODE>(a2, s_a[m], s_a[m]);
                    a1 = scale_pair<MODE>(a1, s_b[m], s_b[m]); a3 = scale_pair<MODE>(a3, s_b[m], s_b[m]);
                } else {  // groups not aligned to chunks: a scale per element (slow path)
                    const u32 e00 = 32 * q + pair_elem(2 * e, 0), e01 = 32 * q + pair_elem(2 * e, 1);
                    const u32 e10 = 32 * q + pair_elem(2 * e + 1, 0), e11 = 32 * q + pair_elem(2 * e + 1, 1);
                    auto gi = [&](u32 el) { u32 v = el / g; return v < ngroups ? v : ngroups - 1; };
                    const size_t oa = (size_t)ra[m] * ngroups, ob = (size_t)rb[m] * ngroups;
                    a0 = scale_pair<MODE>(a0, load_scale<MODE>(ks, oa + gi(e00)), load_scale<MODE>(ks, oa + gi(e01)));
                    a2 = scale_pair<MODE>(a2, load_scale<MODE>(ks, oa + gi(e10)), load_scale<MODE>(ks, oa + gi(e11)));
                    a1 = scale_pair<MODE>(a1, load_scale<MODE>(ks, ob + gi(e00)), load_scale<MODE>(ks, ob + gi(e01)));
                    a3 = scale_pair<MODE>(a3, load_scale<MODE>(ks, ob + gi(e10)), load_scale<MODE>(ks, ob + gi(e11)));
                }
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                // x pair of the same elements: x[el] sits in word el/2, lane el%2 (the two elements
                // of a pair are 8 or 2 apart: same parity)
                constexpr u32 SEL[2] = {0x5410u, 0x7632u};  // lane 0 of both words / lane 1 of both
                const int p0 = pair_elem(2 * e, 0), q0 = pair_elem(2 * e, 1);
                const int p1 = pair_elem(2 * e + 1, 0), q1 = pair_elem(2 * e + 1, 1);
                const bool paired = XS || XT || (XWIN && !checked);  // x staged or tiled: pair words in order
                const u32 b0 = paired ? xw[j][2 * e] : prmt(xw[j][p0 >> 1], xw[j][q0 >> 1], SEL[p0 & 1]);
                const u32 b1 = paired ? xw[j][2 * e + 1] : prmt(xw[j][p1 >> 1], xw[j][q1 >> 1], SEL[p1 & 1]);
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    if (GEMV_DIAG & 4) {  // knock-out: a few ALU ops that keep the operands live
                        acc[m][j][0] += __uint_as_float((a[m][0] ^ b0) & 0x3FFFFFFFu);
                        acc[m][j][1] += __uint_as_float((a[m][1] ^ b1) & 0x3FFFFFFFu);
                        acc[m][j][2] += __uint_as_float(a[m][2] & 0x3FFFFFFFu);
                        acc[m][j][3] += __uint_as_float(a[m][3] & 0x3FFFFFFFu);
                    } else {
                        mma16816<BF>(acc[m][j], a[m][0], a[m][1], a[m][2], a[m][3], b0, b1);
                    }
                }
            }
        }
    };

    // Batch 1: the block stages x once in shared memory (niter*KSTEP chunks x XS_STRIDE words,
    // dynamic), already in pair order (and bf16 when the operands are bf16), zeros past K. Every
    // warp calls this exactly once, after issuing its first weight loads (they overlap), and
    // before it reads x in any kernel kind: the PDL wait for the kernel that writes x is here.
    auto stage_x = [&]() {
        pdl_wait();
        pdl_release();
        constexpr u32 MAG = 0x7FFF7FFFu;  // MODE 4: bf16 magnitude bits of a pair (sign bits cleared)
        // MODE 4: s = x16_shift of the block's largest |x|. |x| is compared as bf16 magnitude
        // bits (their integer order is the numbers'; inf and NaN sort last): m2 holds a thread's
        // largest of each lane; one warp reduction and one barrier give the block's.
        auto x16_scale = [&](u32 m2) {
            __shared__ u32 xmax[WARPS];
            u32 m = __reduce_max_sync(0xFFFFFFFFu, max(m2 & 0xFFFFu, m2 >> 16));
            if (lane == 0) xmax[threadIdx.x >> 5] = m;
            __syncthreads();
            m = xmax[0];
#pragma unroll
            for (int w = 1; w < WARPS; ++w) m = max(m, xmax[w]);
            const int sh = x16_shift(m);
            xpow = pow2f(sh);
            xunpow = unpow2f(sh);
        };
        if (!XS) {  // b1r: a pass over x for its largest |x| (it converts its x window as it goes)
            if constexpr (MODE == 4) {
                u32 m2 = 0;
                for (u32 e = 8 * threadIdx.x; e < k; e += 8 * WARPS * 32) {
                    if (xvec && e + 8 <= k) {
                        const uint4 r = ld_x16(x + e);
                        m2 = __vmaxu2(m2, __vmaxu2(__vmaxu2(r.x & MAG, r.y & MAG), __vmaxu2(r.z & MAG, r.w & MAG)));
                    } else {
                        for (u32 i = e; i < e + 8 && i < k; ++i) m2 = __vmaxu2(m2, (u32)x[i] & 0x7FFFu);
                    }
                }
                x16_scale(m2);
            }
            return;
        }
        // b1: x staged in pair order, converted to the operand type; in MODE 4 staged as bf16 first
        // (finding the largest |x| on the way: x is read from memory once), then converted in place,
        // each thread its own words, once the block's largest is known.
        u32* xsw = const_cast<u32*>(xs);
        const u32 niter_all = (nq + KSTEP - 1) / KSTEP;
        u32 m2 = 0;
        for (u32 q = threadIdx.x; q < niter_all * KSTEP; q += WARPS * 32) {
            u32 w[16];  // w[i] = (x[32q + 2i], x[32q + 2i + 1])
            if (xvec && 32 * q + 32 <= k) {
#pragma unroll
                for (int v = 0; v < 4; ++v) {
                    const uint4 r = ld_x16(x + 32 * (size_t)q + 8 * v);
                    w[4 * v] = r.x; w[4 * v + 1] = r.y; w[4 * v + 2] = r.z; w[4 * v + 3] = r.w;
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) {
                    const u32 e0 = 32 * q + 2 * i;
                    w[i] = (e0 < k ? (u32)x[e0] : 0u) | ((e0 + 1 < k ? (u32)x[e0 + 1] : 0u) << 16);
                }
            }
            if (BF && XF16) {
#pragma unroll
                for (int i = 0; i < 16; ++i) w[i] = f16x2_to_bf16x2(w[i]);
            }
            if constexpr (MODE == 4) {
#pragma unroll
                for (int i = 0; i < 16; ++i) m2 = __vmaxu2(m2, w[i] & MAG);
            }
#pragma unroll
            for (int p = 0; p < 16; ++p) {  // pair p = (x[pair_elem(p,0)], x[pair_elem(p,1)])
                const int p0 = pair_elem(p, 0), p1 = pair_elem(p, 1);
                xsw[q * XS_STRIDE + p] = prmt(w[p0 >> 1], w[p1 >> 1], (p0 & 1) ? 0x7632u : 0x5410u);
            }
        }
        if constexpr (MODE == 4) {
            x16_scale(m2);  // (its barrier is not needed for the words: each thread converts its own)
            for (u32 q = threadIdx.x; q < niter_all * KSTEP; q += WARPS * 32) {
#pragma unroll
                for (int p = 0; p < 16; ++p) xsw[q * XS_STRIDE + p] = bf16x2_to_f16x2_times(xsw[q * XS_STRIDE + p], xpow);
            }
        }
        __syncthreads();
    };

    // Main loop: iterations whose chunks all lie inside K (x rows aligned): no bounds checks,
    // running plane pointers, the next iteration's weights prefetched into registers.
    const u32 nfull = (k / 32) / KSTEP;
    const u32 main_end = xvec ? (it1 < nfull ? it1 : nfull) : 0;
    u32 it = it0;
    if (it >= main_end) stage_x();  // no main iterations: stage now (uniform per warp)
    if (it < main_end) {
        u32 q0 = it * KSTEP + t * (SPREAD ? 1 : CPT);  // this lane's first chunk of iteration `it`
        const u32 qstep = istep * KSTEP;
        ChunkPtr pa[MT], pb[MT];
        u32 dtile[MT];  // tile order: bytes from tile 0's rows to tile m's
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            pa[m] = chunk_at(rowa[m], kp, q0);
            pb[m] = chunk_at(rowb[m], kp, q0);
            dtile[m] = (u32)(rowa[m].base - rowa[0].base);
        }
        // Two register sets: with PP iteration n computes from set n % 2 while the next one's
        // weights (and x, XWIN) load into the other; without, set 1 is copied to set 0 first.
        Chunk wa[2][CPT][MT], wb[2][CPT][MT];
        S swa[2][CPT][MT], swb[2][CPT][MT];
        uint4 xq[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};  // XWIN: lane's 16 bytes of x
        static_assert(!XWIN || KSTEP == 8, "the x window takes 32 lanes x 16 bytes = 8 chunks");
        auto load_main = [&](auto set) {  // the iteration at pa / pb (chunk q0) into register set `set`
            constexpr int P = decltype(set)::value;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                // (tile order: only pa[0] is kept; the other tiles lie dtile[m] bytes further, rows g + 8 below)
                const ChunkPtr pam = TILED && m > 0 ? offset_by(pa[0], dtile[m]) : pa[m];
                const ChunkPtr pbm = TILED ? rows_below(pam) : pb[m];
                if (CPT == 2 && !SPREAD) {  // chunk q0 is even: the two chunks' small planes in one load each
                    load_chunk_pair(pam, wa[P][0][m], wa[P][CPT - 1][m]);
                    load_chunk_pair(pbm, wb[P][0][m], wb[P][CPT - 1][m]);
                } else if (SPREAD_PAIR) {   // chunks q0, q0 + 4 (q0 % 8 = t < 4)
                    load_chunk_spread(pam, wa[P][0][m], wa[P][CPT - 1][m]);
                    load_chunk_spread(pbm, wb[P][0][m], wb[P][CPT - 1][m]);
                }
#pragma unroll
                for (int i = 0; i < CPT; ++i) {
                    if (CPT != 2 || (SPREAD && !SPREAD_PAIR)) {
                        wa[P][i][m] = load_chunk_at(pam, CSTEP * i);
                        wb[P][i][m] = load_chunk_at(pbm, CSTEP * i);
                    }
                    swa[P][i][m] = swb[P][i][m] = S{};
                    if (GM == 1) {
                        const u32 gi = (q0 + CSTEP * i) >> gshift;
                        swa[P][i][m] = load_scale<MODE>(ks, (size_t)ra[m] * ngroups + gi);
                        swb[P][i][m] = load_scale<MODE>(ks, (size_t)rb[m] * ngroups + gi);
                    }
                }
            }
        };
        // GEMV_L2PF (tile order): iteration itp's blocks of every tile of the warp (CPT blocks of TBLK
        // bytes, contiguous) into L2 by one bulk prefetch each, no registers held: bytes in flight
        // beyond the register sets, for devices whose memory needs more of them than two sets hold.
        auto l2_prefetch = [&](u32 itp) {
            if constexpr (GEMV_L2PF > 0 && TILED) {
                if (lane == 0 && itp < main_end) {
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        const u8* blk = rowa[m].base + (size_t)itp * CPT * TBLK;
                        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(blk), "r"((u32)(CPT * TBLK))
                                     : "memory");
                    }
                }
            }
        };
        // One main-loop iteration from register set P; false when it was the slice's last.
        auto step = [&](auto set) -> bool {
            constexpr int P = decltype(set)::value;  // set computed now
            constexpr int N = PP ? 1 - P : 1;        // set the next iteration loads into
            if (!PP) {
#pragma unroll
                for (int i = 0; i < CPT; ++i)
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        wa[P][i][m] = wa[N][i][m]; wb[P][i][m] = wb[N][i][m];
                        swa[P][i][m] = swa[N][i][m]; swb[P][i][m] = swb[N][i][m];
                    }
                xq[P] = xq[N];
            }
            const u32 q = q0;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                advance_by(pa[m], qstep);
                advance_by(pb[m], qstep);
            }
            q0 += qstep;
            const bool more = it + istep < main_end;
            if (more) {  // prefetch the next iteration into the other set
                load_main(Int<N>{});
                if (XWIN) xq[N] = ld_x16(x + 32 * (size_t)((it + istep) * KSTEP) + 8 * lane);
                l2_prefetch(it + (1 + GEMV_L2PF) * istep);
            }
            if (XWIN) {  // this iteration's x into the window
                park_x<BF, XF16, MODE == 4>(xq[P], lane, xwin, xwin + KSTEP * XS_STRIDE, xpow);
                xbase = it * KSTEP;
            }
#pragma unroll
            for (int i = 0; i < CPT; ++i) compute(wa[P][i], wb[P][i], swa[P][i], swb[P][i], q + CSTEP * i, false);
            it += istep;
            return more;
        };
        load_main(Int<PP ? 0 : 1>{});
#pragma unroll
        for (int d = 2; d <= GEMV_L2PF; ++d) l2_prefetch(it + d * istep);  // (the first step prefetches it + D + 1)
        stage_x();  // after this warp's first weight loads are in flight
        // XWIN: lane l carries x elements 8l .. 8l+7 of an iteration's KSTEP chunks (16 bytes)
        if (XWIN) xq[PP ? 0 : 1] = ld_x16(x + 32 * (size_t)(it * KSTEP) + 8 * lane);
        if (PP) {
            while (step(Int<0>{}) && step(Int<1>{})) {
            }
        } else {
            while (step(Int<0>{})) {
            }
        }
    }
    // Tail: the iteration that reaches past K (and everything when x rows are not aligned).
    Chunk ca[CPT][MT], cb[CPT][MT];
    S sa[CPT][MT], sb[CPT][MT];
#pragma unroll
    for (int i = 0; i < CPT; ++i)
#pragma unroll
        for (int m = 0; m < MT; ++m) sa[i][m] = sb[i][m] = S{};
    for (; it < it1; it += istep) {
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const u32 q = it * KSTEP + (SPREAD ? t + 4 * i : t * CPT + i);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (q < nq) {
                    ca[i][m] = load_chunk(rowa[m], kp, q);
                    cb[i][m] = load_chunk(rowb[m], kp, q);
                    if (GM == 1) {
                        const u32 gi = q >> gshift;
                        sa[i][m] = load_scale<MODE>(ks, (size_t)ra[m] * ngroups + gi);
                        sb[i][m] = load_scale<MODE>(ks, (size_t)rb[m] * ngroups + gi);
                    }
                } else {  // beyond K: zero codes decode to +0 and contribute nothing
                    ca[i][m] = Chunk{};
                    cb[i][m] = Chunk{};
                }
            }
            compute(ca[i], cb[i], sa[i], sb[i], q, true);
        }
    }

    if constexpr (MODE == 5) {  // float row scales times 2^(15-bias) times the column's 2^-s_b (exmy_x_tiles)
        const float p15 = __uint_as_float(POW2_15_BITS);
        const float* un = (const float*)((const char*)x + x_tile_factors(k, NT));
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {  // acc[.][j][c] and [2 + c]: column 8j + 2t + c
                const u32 col = 8 * j + 2 * t + c;
                const float f = un[col];  // (columns past the batch: their sums are zeros, never written)
#pragma unroll
                for (int m = 0; m < MT; ++m) {  // exact: powers of two (fmul_rn keeps a subnormal 2^-127)
                    acc[m][j][c] = fmul_rn(acc[m][j][c], fmul_rn(fmul_rn(rsa[m], p15), f));
                    acc[m][j][2 + c] = fmul_rn(acc[m][j][2 + c], fmul_rn(fmul_rn(rsb[m], p15), f));
                }
            }
    } else if (EPI) {  // row scales: fp16 bits of S = scale*2^(15-bias) (MODE 0) or of scale (MODE 1); float (MODE 3, 4)
        const float p15 = __uint_as_float(POW2_15_BITS);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            float fa, fb;
            if constexpr (MODE == 3) {
                fa = rsa[m]; fb = rsb[m];
            } else if constexpr (MODE == 4) {  // exact: powers of two (fmul_rn keeps a subnormal 2^-127)
                fa = fmul_rn(fmul_rn(rsa[m], p15), xunpow);
                fb = fmul_rn(fmul_rn(rsb[m], p15), xunpow);
            } else {
                fa = MODE == 0 ? f16_to_f32((u32)rsa[m]) : fmul_rn(f16_to_f32((u32)rsa[m]), p15);
                fb = MODE == 0 ? f16_to_f32((u32)rsb[m]) : fmul_rn(f16_to_f32((u32)rsb[m]), p15);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                acc[m][j][0] = fmul_rn(acc[m][j][0], fa); acc[m][j][1] = fmul_rn(acc[m][j][1], fa);
                acc[m][j][2] = fmul_rn(acc[m][j][2], fb); acc[m][j][3] = fmul_rn(acc[m][j][3], fb);
            }
        }
    }
}

// Block = WARPS warps = (WARPS / split) warp tiles of 16*MT rows x `split` K slices (split in 1,2,4,8).
// interleave = 0: slice s takes a contiguous run of iterations; 1: iterations s, s+split, ...
// (the split warps of a tile then read neighbouring bytes of the same rows at the same time).
template <int KIND, int MODE, bool XF16, int GM, int BLOCKS, bool XT>
__device__ __forceinline__ void gemv(const u8* __restrict__ payload, const void* __restrict__ ks,
                                     const u16* __restrict__ x, u16* __restrict__ y, u32 n, u32 k,
                                     u32 stride, u32 ngroups, u32 g, int gshift, u32 batch, u32 split,
                                     u32 interleave) {
    constexpr int NT = Cfg<KIND, BLOCKS>::NT, KSTEP = Cfg<KIND, BLOCKS>::KSTEP, MT = Cfg<KIND, BLOCKS>::MT;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 tiles_per_block = WARPS / split;
    const u32 tile = blockIdx.x * tiles_per_block + warp / split;
    const u32 slice = warp % split;
    const u32 row0 = tile * 16 * MT;
    const u32 nq = (k + 31) / 32;
    const u32 niter = (nq + KSTEP - 1) / KSTEP;
    u32 it0, it1, istep;
    if (interleave) {
        it0 = slice; it1 = niter; istep = split;
    } else {
        const u32 per = (niter + split - 1) / split;    // iterations per slice
        it0 = slice * per < niter ? slice * per : niter;
        it1 = it0 + per < niter ? it0 + per : niter;
        istep = 1;
    }

    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
    extern __shared__ uint4 xs_dyn[];  // batch-1 kernels: x staged by the block (see gemv_warp)
    // every warp takes part (the x staging has a block barrier); warps past the last row do no work
    gemv_warp<KIND, MODE, XF16, GM, BLOCKS, XT>(payload, ks, x, (u32*)xs_dyn, n, k, stride, ngroups, g, gshift,
                                            batch, row0 < n ? row0 : n - 1, it0, row0 < n ? it1 : it0, istep, acc);

    // Cross-slice reduction: lane holds (row 16m + gr, cols 8j + 2t, +1) in acc[m][j][0..1], row
    // 16m + gr + 8 in [2..3].
    constexpr int FR = MT * NT * 4;  // fragment registers per lane
    __shared__ float red[WARPS][FR][32];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[warp][(m * NT + j) * 4 + r][lane] = acc[m][j][r];
    __syncthreads();
    // thread -> (tile in block, fragment register idx, lane)
    for (u32 o = threadIdx.x; o < tiles_per_block * FR * 32; o += WARPS * 32) {
        const u32 tb = o / (FR * 32), rem = o % (FR * 32);
        const u32 idx = rem >> 5, ln = rem & 31;
        float sum = 0.f;
        for (u32 w = 0; w < split; ++w) sum += red[tb * split + w][idx][ln];
        const u32 m = idx / (NT * 4), j = (idx >> 2) % NT, r = idx & 3;
        const u32 row = (blockIdx.x * tiles_per_block + tb) * 16 * MT + 16 * m + (ln >> 2) + (r >= 2 ? 8 : 0);
        const u32 col = 8 * j + 2 * (ln & 3) + (r & 1);
        if (row < n && col < batch) {
            u16 out;
            if (XF16) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out) : "f"(sum));
            else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(sum));
            y[(size_t)col * n + row] = out;
        }
    }
}

}  // namespace

// The GEMV kernel. KIND: 0 b1, 1 nt1, 2 nt2, 3 b1r, 4 nt2w, 5 nt1w (Cfg). MODE: 0 fp16 operands with the scale
// folded, 1 fp16 operands in two steps, 2 bf16 operands, 3 bf16 operands with the row scale after
// the mma (one scale per row), 4 bf16 x as scaled fp16 (b1, b1r; see the top), 5 x given as scaled fp16
// by exmy_x_tiles (y bf16; see the top). XF16: x and y are fp16, else
// bf16. GM: 0 one scale per row, 1 scale groups aligned to 32-element chunks, 2 not aligned (a
// scale per element, slower). BLOCKS: blocks per SM the register budget is sized for, 3 (<= 80
// registers) or 2 (<= 128); the host takes 3 for the b1 and nt1 fp16-operand kernels with one scale
// per row and codes of <= 5 bits (no spills), and for b1r where that fills the last wave of blocks
// better (cuda/gpu.py gemv_blocks, gemv_b1r_blocks). XT: x comes as x tiles written by exmy_x_tiles
// just before, already in the operand type (x_tile_word; any batch 2..16 kind in any MODE but 4; the
// host takes them at batch 9..16, with bf16 operands only on large layers, and always in MODE 5:
// cuda/gpu.py gemv_tiled).
// The host instantiates the one kernel it launches by name through NVRTC (cuda/gpu.py GemvKernel:
// e.g. exmy_gemv<3, 0, true, 0, 2, false>), so every compilation builds a single kernel (less NVRTC time).
template <int KIND, int MODE, bool XF16, int GM, int BLOCKS, bool XT>
__global__ void __launch_bounds__(GEMV_WARPS * 32, BLOCKS)
exmy_gemv(const u8* __restrict__ payload, const void* __restrict__ ks, const u16* __restrict__ x,
          u16* __restrict__ y, u32 n, u32 k, u32 stride, u32 ngroups, u32 g, int gshift, u32 batch,
          u32 split, u32 interleave) {
    // fp16 operands hold the raw code values as fp16 numbers: E = 5 would fill the fp16 exponent field
    static_assert(MODE >= 2 || (F16_OK && XF16), "fp16 operands (MODE 0, 1) need E <= 4 and fp16 x");
    static_assert(MODE < 4 || F16_OK, "fp16 operands (MODE 4, 5) need E <= 4");
    gemv<KIND, MODE, XF16, GM, BLOCKS, XT>(payload, ks, x, y, n, k, stride, ngroups, g, gshift, batch, split,
                                           interleave);
}

// The routed GEMV of a mixture-of-experts projection (torch/experts.py): the weights of all
// experts stacked in one payload (expert e's rows start expert_bytes * e bytes in, its kernel scales
// expert_scale_bytes * e bytes in) and the routing read from device memory, so the host never learns
// which experts the tokens chose and a CUDA graph captured once serves every routing. Grid row
// blockIdx.y is pair p of the routing: y row p = x row p / x_div times expert ids[p]'s weight, by the
// batch-1 kernel (KIND 0 or 3) of exmy_gemv (x_div: top-k when the pairs of a token share its x row,
// 1 when x has a row per pair). With the same split each row equals exmy_gemv's launch for that
// expert bit for bit. An id outside 0 .. experts-1 (an expert-parallel sentinel) writes zeros.
template <int KIND, int MODE, bool XF16, int GM, int BLOCKS>
__global__ void __launch_bounds__(GEMV_WARPS * 32, BLOCKS)
exmy_gemv_routed(const u8* __restrict__ payload, const void* __restrict__ ks, const u16* __restrict__ x,
                 u16* __restrict__ y, u32 n, u32 k, u32 stride, u32 ngroups, u32 g, int gshift, u32 batch,
                 u32 split, u32 interleave, const long long* __restrict__ ids, u32 experts,
                 unsigned long long expert_bytes, unsigned long long expert_scale_bytes, u32 x_div) {
    static_assert(KIND == 0 || KIND == 3, "a routed pair is a batch-1 GEMV");
    static_assert(MODE >= 2 || (F16_OK && XF16), "fp16 operands (MODE 0, 1) need E <= 4 and fp16 x");
    static_assert(MODE != 4 || F16_OK, "fp16 operands (MODE 4) need E <= 4");
    static_assert(MODE != 5, "MODE 5's x is converted per launch, not per pair");
    // The ids are usually the output of the kernel just before (top-k): unlike exmy_gemv, whose weight
    // loads start before the PDL wait, nothing here can be read before it.
    pdl_wait();
    const u32 p = blockIdx.y;
    const long long e = ids[p];
    y += (size_t)p * n;
    if (e < 0 || e >= (long long)experts) {
        pdl_release();
        const u32 rows = (WARPS / split) * 16 * Cfg<KIND, BLOCKS>::MT, r0 = blockIdx.x * rows;
        for (u32 r = r0 + threadIdx.x; r < r0 + rows && r < n; r += WARPS * 32) y[r] = 0;  // +0 in fp16 and bf16
        return;
    }
    gemv<KIND, MODE, XF16, GM, BLOCKS, false>(payload + (size_t)e * expert_bytes,
                                       (const char*)ks + (size_t)e * expert_scale_bytes, x + (size_t)(p / x_div) * k,
                                       y, n, k, stride, ngroups, g, gshift, 1, split, interleave);
}

// x tiles (see x_tile_word) for the batch 2..16 kinds: blocks (b, y) write batch row b of the tiles (zeros
// for b >= batch; gridDim.x is 8 * nt, nt = 1 for batch <= 8, else 2), block y the y-th of gridDim.y runs
// of its chunks: spread over many SMs, the pass ends sooner (the GEMV waits for it). A thread takes whole
// chunks, loads x's 64 bytes of each, puts their elements in pair order (one PRMT per pair word) and
// stores them where the GEMV's lanes load them, in the GEMV's operand type. CONV: X_COPY (x's type is the
// operands'), X_BF16 (fp16 x for bf16 operands, MODE 2: rounded to bf16 once here instead of at every
// load), X_SCALED (MODE 5, bf16 x): converted to fp16 x * 2^s_b, s_b = x16_shift of the row's largest |x|;
// 2^-s_b goes as a float to byte x_tile_factors(k, nt) + 4b. X_SCALED: every block of a row reads the
// whole row for its largest |x| (the same in each), rows of up to HELD * THREADS chunks once, every load
// issued before the block's reduction (one memory round trip); longer rows take a second pass (from
// cache). A template only so that the host builds it by name alone, like exmy_gemv (THREADS: the block
// size it is launched with).
constexpr int X_COPY = 0, X_BF16 = 1, X_SCALED = 2;  // exmy_x_tiles' conversions (cuda/gpu.py x_tiles_conv)
template <int THREADS, int CONV>
__global__ void __launch_bounds__(THREADS)
exmy_x_tiles(const u16* __restrict__ x, u32* __restrict__ xt, u32 k, u32 batch) {
    constexpr int HELD = 2;  // chunks per thread kept in registers
    constexpr bool SCALED = CONV == X_SCALED;
    pdl_wait();     // x may be the previous kernel's output
    pdl_release();  // the GEMV may start its weight loads; it waits for this grid before it reads the tiles
    const u32 b = blockIdx.x, nt = gridDim.x / 8;
    const u32 nq = (k + 127) / 128 * 4;  // chunks, whole iterations of 4
    const u32 per = (nq + gridDim.y - 1) / gridDim.y, q_lo = blockIdx.y * per, q_hi = min(nq, q_lo + per);
    const bool real = b < batch, vec = (k % 8) == 0;
    const u16* xb = x + (size_t)(real ? b : 0) * k;
    auto load = [&](u32 q, u32 (&w)[16]) {  // w[i] = (x[32q + 2i], x[32q + 2i + 1]) of row b, zeros past K
        if (real && vec && 32 * q + 32 <= k) {
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint4 r = ld_x16(xb + 32 * (size_t)q + 8 * v);
                w[4 * v] = r.x; w[4 * v + 1] = r.y; w[4 * v + 2] = r.z; w[4 * v + 3] = r.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                const u32 e0 = 32 * q + 2 * i;
                w[i] = real ? (e0 < k ? (u32)xb[e0] : 0u) | ((e0 + 1 < k ? (u32)xb[e0 + 1] : 0u) << 16) : 0u;
            }
        }
    };
    auto store = [&](u32 q, const u32 (&w)[16], float xpow) {  // chunk q's pair words into the tiles
        u32 p[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const int e0 = pair_elem(i, 0), e1 = pair_elem(i, 1);
            p[i] = prmt(w[e0 >> 1], w[e1 >> 1], (e0 & 1) ? 0x7632u : 0x5410u);
            if (SCALED) p[i] = bf16x2_to_f16x2_times(p[i], xpow);
            if (CONV == X_BF16) p[i] = f16x2_to_bf16x2(p[i]);
        }
        u32* dst = xt + x_tile_word(q, b, nt);
#pragma unroll
        for (int v = 0; v < 4; ++v) *(uint4*)(dst + 128 * v) = make_uint4(p[4 * v], p[4 * v + 1], p[4 * v + 2], p[4 * v + 3]);
    };
    float xpow = 1.f;
    const bool held = nq <= (u32)HELD * THREADS;
    u32 w[HELD][16];
    if (SCALED) {  // the row's largest |x| as bf16 magnitude bits (integer order = the numbers' order)
        constexpr u32 MAG = 0x7FFF7FFFu;
        u32 m2 = 0;
        if (held) {
#pragma unroll
            for (int h = 0; h < HELD; ++h) {
                const u32 q = threadIdx.x + h * THREADS;
                if (q < nq) load(q, w[h]);
#pragma unroll
                for (int i = 0; i < 16; ++i) m2 = __vmaxu2(m2, q < nq ? w[h][i] & MAG : 0u);
            }
        } else {
            for (u32 q = threadIdx.x; q < nq; q += THREADS) {
                u32 v[16];
                load(q, v);
#pragma unroll
                for (int i = 0; i < 16; ++i) m2 = __vmaxu2(m2, v[i] & MAG);
            }
        }
        __shared__ u32 wmax[THREADS / 32];
        u32 m = __reduce_max_sync(0xFFFFFFFFu, max(m2 & 0xFFFFu, m2 >> 16));
        if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = m;
        __syncthreads();
        m = wmax[0];
#pragma unroll
        for (int i = 1; i < THREADS / 32; ++i) m = max(m, wmax[i]);
        const int sh = x16_shift(m);
        xpow = pow2f(sh);
        if (threadIdx.x == 0) ((float*)((char*)xt + x_tile_factors(k, nt)))[b] = unpow2f(sh);
    }
    if (SCALED && held) {
#pragma unroll
        for (int h = 0; h < HELD; ++h) {
            const u32 q = threadIdx.x + h * THREADS;
            if (q >= q_lo && q < q_hi) store(q, w[h], xpow);
        }
    } else {
        for (u32 q = q_lo + threadIdx.x; q < q_hi; q += THREADS) {
            u32 v[16];
            load(q, v);
            store(q, v, xpow);
        }
    }
}

// nvcc builds (no NVRTC name expressions: tests/test_kernel_build.py, scripts/compare-sass) include
// this file and then name their instantiations, e.g. EXMY_GEMV_INSTANCE(exmy_gemv<3, 0, true, 0, 2, false>).
#define EXMY_GEMV_INSTANCE(...)                                                                   \
    template __global__ void __VA_ARGS__(const u8*, const void*, const u16*, u16*, u32, u32, u32, u32, u32, \
                                         int, u32, u32, u32);
#define EXMY_GEMV_ROUTED_INSTANCE(...)                                                            \
    template __global__ void __VA_ARGS__(const u8*, const void*, const u16*, u16*, u32, u32, u32, u32, u32, \
                                         int, u32, u32, u32, const long long*, u32, unsigned long long,  \
                                         unsigned long long, u32);
#define EXMY_X_TILES_INSTANCE(...) template __global__ void __VA_ARGS__(const u16*, u32*, u32, u32);
