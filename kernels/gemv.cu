// gemv.cu - fused dequant + GEMV / small-batch GEMM: y[b, n] = sum_k x[b, k] * W[n, k], batch 1..16.
//
// Each packed weight is read from memory once and decoded in registers (exmy_decode.cuh) straight
// into tensor-core operands: mma.sync m16n8k16 with the weights as A (16 rows x 16 k) and x as B
// (16 k x 8 batch columns), float32 accumulators.
//
// Work split. A block of WARPS warps owns 16 weight rows and walks the whole K: iteration `it`
// covers 32-element chunks it*KSTEP .. it*KSTEP+KSTEP-1, and warp w takes iterations w, w+WARPS, ...
// Lane (g = lane/4, t = lane%4) loads CPT consecutive chunks of rows g and g+8 (16 B of the 4-bit
// plane + 4 B of the 1-bit plane per chunk for e2m2: the 4 lanes of a row read 64*CPT contiguous
// bytes) and the same chunks of x for batch rows g (and g+8 when NT = 2). Partial sums of the
// warps meet in shared memory; one rounding to the output type at the end.
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
// x of the other 16-bit type is converted once per load (MODE 2 with fp16 x: x rounded to bf16).
//
// Compile with -DEXMY_E, -DEXMY_M (and optionally -DGEMV_WARPS, -DGEMV_CPT).
#include "exmy_decode.cuh"

using namespace exmy;

#ifndef GEMV_WARPS
#define GEMV_WARPS 8
#endif
#ifndef GEMV_CPT
#define GEMV_CPT 0  // 0: 2 chunks per lane and iteration, 1 for codes of 7-8 bits (register budget)
#endif

namespace {

constexpr int WARPS = GEMV_WARPS;
constexpr int CPT = GEMV_CPT > 0 ? GEMV_CPT : (BITS >= 7 ? 1 : 2);  // consecutive chunks per lane per iteration
constexpr int KSTEP = 4 * CPT;    // chunks per warp iteration (the 4 lanes t = 0..3 of a row)

__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));  // IEEE fp16 multiply, subnormals kept
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

template <int MODE>
__device__ __forceinline__ typename ScaleT<MODE>::type load_scale(const void* ks, size_t i) {
    if constexpr (MODE == 2) return ((const float*)ks)[i];
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
        float lo = __uint_as_float(bf16_lane_bits(h, 0)) * p127 * s0;  // (exact v) * scale, exact in fp32
        float hi = __uint_as_float(bf16_lane_bits(h, 1)) * p127 * s1;
        return bf16x2_rn(lo, hi);
    }
}

template <int NT, int MODE, bool XF16>
__device__ __forceinline__ void gemv(const u8* __restrict__ payload, const void* __restrict__ ks,
                                     const u16* __restrict__ x, u16* __restrict__ y, u32 n, u32 k,
                                     u32 row_bytes, u32 ngroups, u32 g, int gshift, u32 batch) {
    constexpr bool BF = MODE == 2;  // tensor-core operand type
    typedef typename ScaleT<MODE>::type S;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 gr = lane >> 2, t = lane & 3;     // mma groupID / thread-in-group
    const u32 row0 = blockIdx.x * 16;
    const u32 ra = row0 + gr < n ? row0 + gr : n - 1;           // clamp: tail rows re-read row n-1
    const u32 rb = row0 + gr + 8 < n ? row0 + gr + 8 : n - 1;
    const u32 kp = row_bytes * 8 / BITS;
    const u32 nq = (k + 31) / 32;               // chunks holding real elements
    const u32 niter = (nq + KSTEP - 1) / KSTEP;
    const u8* pa = payload + (size_t)ra * row_bytes;
    const u8* pb = payload + (size_t)rb * row_bytes;
    // gshift >= 0: group index = chunk >> gshift (31 for one group per row); -1: per-element groups.
    const bool aligned = gshift >= 0;
    const bool xvec = (k % 8) == 0;             // x rows 16-byte aligned

    float acc[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

    Chunk ca[CPT], cb[CPT];
    S sa[CPT], sb[CPT];
    auto load_w = [&](u32 it) {
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const u32 q = it * KSTEP + t * CPT + i;
            if (it < niter && q < nq) {
                ca[i] = load_chunk(pa, kp, q);
                cb[i] = load_chunk(pb, kp, q);
                if (aligned) {
                    const u32 gi = q >> gshift;
                    sa[i] = load_scale<MODE>(ks, (size_t)ra * ngroups + gi);
                    sb[i] = load_scale<MODE>(ks, (size_t)rb * ngroups + gi);
                }
            } else {  // beyond K: zero codes decode to +0 (all lanes must join the mma)
                ca[i] = Chunk{};
                cb[i] = Chunk{};
                sa[i] = sb[i] = S{};
            }
        }
    };

    load_w(warp);
    for (u32 it = warp; it < niter; it += WARPS) {
        Chunk na[CPT], nb[CPT];
        S nsa[CPT], nsb[CPT];
#pragma unroll
        for (int i = 0; i < CPT; ++i) { na[i] = ca[i]; nb[i] = cb[i]; nsa[i] = sa[i]; nsb[i] = sb[i]; }
        load_w(it + WARPS);  // prefetch the next iteration while this one computes
#pragma unroll
        for (int i = 0; i < CPT; ++i) {
            const u32 q = it * KSTEP + t * CPT + i;
            // x words of this chunk for batch rows gr (+8): xw[j][w] = (x[2w], x[2w+1])
            u32 xw[NT][16];
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const u32 b = gr + 8 * j;
                if (b < batch && q < nq) {
                    const u16* xr = x + (size_t)b * k + 32 * q;
                    if (xvec && 32 * q + 32 <= k) {
#pragma unroll
                        for (int v = 0; v < 4; ++v) {
                            uint4 r = ld_x16(xr + 8 * v);
                            xw[j][4 * v] = r.x; xw[j][4 * v + 1] = r.y; xw[j][4 * v + 2] = r.z; xw[j][4 * v + 3] = r.w;
                        }
                    } else {  // tail of K (or unaligned rows): element-wise, zeros past K
#pragma unroll
                        for (int w = 0; w < 16; ++w) {
                            u32 lo = 32 * q + 2 * w < k ? xr[2 * w] : 0u;
                            u32 hi = 32 * q + 2 * w + 1 < k ? xr[2 * w + 1] : 0u;
                            xw[j][w] = lo | (hi << 16);
                        }
                    }
                    if (BF && XF16) {
#pragma unroll
                        for (int w = 0; w < 16; ++w) xw[j][w] = f16x2_to_bf16x2(xw[j][w]);
                    }
                } else {
#pragma unroll
                    for (int w = 0; w < 16; ++w) xw[j][w] = 0u;
                }
            }

            const Pre prea = prepare(na[i]), preb = prepare(nb[i]);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                u32 a0, a1, a2, a3;
                decode_group<BF>(na[i], prea, e, a0, a2);  // row gr:   pairs 2e (k slots 2t,2t+1), 2e+1 (2t+8,2t+9)
                decode_group<BF>(nb[i], preb, e, a1, a3);  // row gr+8: same pairs
                if (aligned) {
                    a0 = scale_pair<MODE>(a0, nsa[i], nsa[i]);
                    a2 = scale_pair<MODE>(a2, nsa[i], nsa[i]);
                    a1 = scale_pair<MODE>(a1, nsb[i], nsb[i]);
                    a3 = scale_pair<MODE>(a3, nsb[i], nsb[i]);
                } else {  // groups not aligned to chunks: a scale per element (slow path)
                    const u32 e00 = 32 * q + pair_elem(2 * e, 0), e01 = 32 * q + pair_elem(2 * e, 1);
                    const u32 e10 = 32 * q + pair_elem(2 * e + 1, 0), e11 = 32 * q + pair_elem(2 * e + 1, 1);
                    auto gi = [&](u32 el) { u32 v = el / g; return v < ngroups ? v : ngroups - 1; };
                    const size_t oa = (size_t)ra * ngroups, ob = (size_t)rb * ngroups;
                    a0 = scale_pair<MODE>(a0, load_scale<MODE>(ks, oa + gi(e00)), load_scale<MODE>(ks, oa + gi(e01)));
                    a2 = scale_pair<MODE>(a2, load_scale<MODE>(ks, oa + gi(e10)), load_scale<MODE>(ks, oa + gi(e11)));
                    a1 = scale_pair<MODE>(a1, load_scale<MODE>(ks, ob + gi(e00)), load_scale<MODE>(ks, ob + gi(e01)));
                    a3 = scale_pair<MODE>(a3, load_scale<MODE>(ks, ob + gi(e10)), load_scale<MODE>(ks, ob + gi(e11)));
                }
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    // x pair of the same elements: x[el] sits in word el/2, lane el%2 (el and el+8 share parity)
                    constexpr u32 SEL[2] = {0x5410u, 0x7632u};  // take lane 0 of both / lane 1 of both
                    const int p0 = pair_elem(2 * e, 0), p1 = pair_elem(2 * e + 1, 0);
                    const u32 b0 = prmt(xw[j][p0 >> 1], xw[j][(p0 + 8) >> 1], SEL[p0 & 1]);
                    const u32 b1 = prmt(xw[j][p1 >> 1], xw[j][(p1 + 8) >> 1], SEL[p1 & 1]);
                    mma16816<BF>(acc[j], a0, a1, a2, a3, b0, b1);
                }
            }
        }
    }

    // Cross-warp reduction: lane holds (row gr, cols 2t, 2t+1) in acc[j][0..1], row gr+8 in [2..3].
    __shared__ float red[WARPS][NT * 4][32];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[warp][4 * j + r][lane] = acc[j][r];
    __syncthreads();
    if (threadIdx.x < NT * 4 * 32) {
        const u32 idx = threadIdx.x >> 5, ln = threadIdx.x & 31;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += red[w][idx][ln];
        const u32 j = idx >> 2, r = idx & 3;
        const u32 row = row0 + (ln >> 2) + (r >= 2 ? 8 : 0);
        const u32 col = 8 * j + 2 * (ln & 3) + (r & 1);
        if (row < n && col < batch) {
            u16 o;
            if (XF16) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(o) : "f"(s));
            else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o) : "f"(s));
            y[(size_t)col * n + row] = o;
        }
    }
}

}  // namespace

// Each variant has a number; compiling with -DEXMY_VARIANT=<n> builds that one kernel only (the
// Python loader does this: less NVRTC time); without it every variant is built.
#define EXMY_GEMV_KERNEL(NAME, NT, MODE, XF16)                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 2) NAME(                            \
        const u8* __restrict__ payload, const void* __restrict__ ks, const u16* __restrict__ x,       \
        u16* __restrict__ y, u32 n, u32 k, u32 row_bytes, u32 ngroups, u32 g, int gshift, u32 batch) { \
        gemv<NT, MODE, XF16>(payload, ks, x, y, n, k, row_bytes, ngroups, g, gshift, batch);          \
    }
#ifdef EXMY_VARIANT
#define EXMY_ALL 0
#else
#define EXMY_ALL 1
#define EXMY_VARIANT (-1)
#endif

// Names: exmy_gemv_<mode>_<x/y dtype>_nt<1|2>; nt1 serves batch 1..8, nt2 batch 9..16.
// fp16 tensor-core operands need E <= 4 (kernels 0-3); bf16 ones work for every format.
#if EXMY_E <= 4
#if EXMY_ALL || EXMY_VARIANT == 0
EXMY_GEMV_KERNEL(exmy_gemv_fold_x16_nt1, 1, 0, true)
#endif
#if EXMY_ALL || EXMY_VARIANT == 1
EXMY_GEMV_KERNEL(exmy_gemv_fold_x16_nt2, 2, 0, true)
#endif
#if EXMY_ALL || EXMY_VARIANT == 2
EXMY_GEMV_KERNEL(exmy_gemv_two_x16_nt1, 1, 1, true)
#endif
#if EXMY_ALL || EXMY_VARIANT == 3
EXMY_GEMV_KERNEL(exmy_gemv_two_x16_nt2, 2, 1, true)
#endif
#endif
#if EXMY_ALL || EXMY_VARIANT == 4
EXMY_GEMV_KERNEL(exmy_gemv_bf_x16_nt1, 1, 2, true)
#endif
#if EXMY_ALL || EXMY_VARIANT == 5
EXMY_GEMV_KERNEL(exmy_gemv_bf_x16_nt2, 2, 2, true)
#endif
#if EXMY_ALL || EXMY_VARIANT == 6
EXMY_GEMV_KERNEL(exmy_gemv_bf_xbf_nt1, 1, 2, false)
#endif
#if EXMY_ALL || EXMY_VARIANT == 7
EXMY_GEMV_KERNEL(exmy_gemv_bf_xbf_nt2, 2, 2, false)
#endif
