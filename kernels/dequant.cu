// dequant.cu - packed .exmy payload + scales -> fp16 / bf16 / fp32, bit-exact with the CPU reference.
//
// A unit is one (row, 32-element chunk); a thread loads its DEQUANT_UNITS units, then decodes
// each. Units are numbered in the payload's byte order (unit_at), so a warp's loads are contiguous in
// both: 32 chunks of one row in row order, 8 rows x one 4-chunk block in tile order. Codes are decoded in registers by exmy_decode.cuh into the bf16 field placement (works for
// every E, including E = 5), turned into the exact float32 code value v by one exact multiply by
// 2^(127 - bias), multiplied by the float32 value of the fp16/bf16 scale (exact: SPEC section 2,
// and the same IEEE product numpy computes), and rounded once to the output type with cvt.rn
// (round to nearest even). fp32 output is not rounded. Float32 multiplies go through fmul_rn
// (inline PTX without .ftz): CuPy compiles with -ftz=true.
// 16-bit outputs of whole warps (K % 32 == 0) are staged through shared memory so that each store
// instruction of a warp writes 512 contiguous bytes.
//
// Rows start `stride` bytes apart (a multiple of 16: cuda/gpu.py device_stride), their planes at
// the offsets of SPEC section 3.
// Compile with -DEXMY_E=<E> -DEXMY_M=<M> (shared formats eXmYsk: also -DEXMY_SHARE=<k>). Kernels: exmy_dequant_s{16,bf}_o{16,bf,32}
// (scale dtype F16/BF16, output F16/BF16/F32). Block size: DEQUANT_BLOCK (256) threads.
#include "exmy_decode.cuh"

using namespace exmy;

#define DEQUANT_BLOCK 256  // threads per block; the host launches exactly this many
#ifndef DEQUANT_MIN_BLOCKS
#define DEQUANT_MIN_BLOCKS 4  // blocks per SM the register budget is sized for (4: 64 registers;
                              // faster than 3 on every H100 shape: docs/benchmarks.md, H100 tuning)
#endif
#define DEQUANT_UNITS 2  // units per thread (cuda/gpu.py DEQUANT_UNITS): block b covers units
                         // b*BLOCK*UNITS .. (b+1)*BLOCK*UNITS-1, thread t units t, t+BLOCK, ...
                         // (2: loads of both in flight; the best of 1, 2, 4, 8 on an H100:
                         // docs/benchmarks.md, H100 tuning)

namespace {

__device__ __forceinline__ float scale_value(u16 bits, bool bf16) {
    if (bf16) return __uint_as_float((u32)bits << 16);  // bf16 = top 16 bits of a float32
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));  // exact widening of an fp16
    return f;
}

// Two float32 -> one word of two 16-bit floats, each rounded to nearest even: lo in bits 15..0.
template <int OUT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (OUT == 0) asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <int OUT>
__device__ __forceinline__ u16 pack1(float v) {
    u16 r;
    if (OUT == 0) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
    else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}

// Output stores are written once and not read by this kernel: streaming (evict-first) stores,
// faster on an H100 than plain ones (docs/benchmarks.md, H100 tuning).
__device__ __forceinline__ void st_stream16(uint4* p, uint4 v) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

struct Unit {
    u32 row, c;  // chunk c of row `row`
};

// Unit u in the payload's byte order. Row order: chunk u % cpr of row u / cpr. Tile order (cpr a
// multiple of 4, rows of 16): u = ((tile * cpr/4 + block) * 16 + row in tile) * 4 + chunk in block,
// the order of the bytes of each plane; a warp reads 8 rows' 4 chunks of one block, 32 x (chunk bytes)
// contiguous per plane, where the row's 32 chunks would be 8 runs of 4 chunks.
__device__ __forceinline__ Unit unit_at(u32 u, u32 cpr) {
    if (TILED) {
        const u32 q = u >> 6, nb = cpr >> 2, tile = q / nb;
        return {16 * tile + ((u >> 2) & 15), 4 * (q - tile * nb) + (u & 3)};
    }
    const u32 row = u / cpr;
    return {row, u - row * cpr};
}

__device__ __forceinline__ Chunk load_unit(const u8* __restrict__ payload, u32 u, u32 cpr, u32 k, u32 stride) {
    const Unit un = unit_at(u, cpr);
    return load_chunk(row_ref(payload, un.row, stride), padded_k(k), un.c);
}

// OUT: 0 = fp16 bits, 1 = bf16 bits, 2 = float32.
template <bool SCALE_BF16, int OUT>
__device__ __forceinline__ void dequant_unit(const Chunk& ch, u32 u, const u16* __restrict__ scales,
                                             void* __restrict__ out, u32 rows, u32 k, u32 ngroups, u32 g) {
    const u32 cpr = (k + 31) / 32;  // chunks per row holding real elements (= Kp / 32)
    const Unit un = unit_at(u, cpr);
    const u32 row = un.row, c = un.c;
    const u32 base = 32 * c;  // first element of this chunk in the row

    const Pre pre = prepare(ch, c);
    const float p127 = __uint_as_float(POW2_127_BITS);  // 2^(127 - bias): exact power of two

    float v[32];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        u32 h0, h1;
        decode_group<true>(ch, pre, e, h0, h1);  // pairs 2e, 2e+1 in bf16 placement
        // raw bf16 lane -> float32 (bits << 16, may be subnormal), times 2^(127-bias): exact value
        v[pair_elem(2 * e, 0)] = fmul_rn(__uint_as_float(bf16_lane_bits(h0, 0)), p127);
        v[pair_elem(2 * e, 1)] = fmul_rn(__uint_as_float(bf16_lane_bits(h0, 1)), p127);
        v[pair_elem(2 * e + 1, 0)] = fmul_rn(__uint_as_float(bf16_lane_bits(h1, 0)), p127);
        v[pair_elem(2 * e + 1, 1)] = fmul_rn(__uint_as_float(bf16_lane_bits(h1, 1)), p127);
    }

    const u16* srow = scales + (size_t)row * ngroups;
    if (ngroups == 1 || g % 32 == 0) {  // the chunk lies inside one group
        const float s = scale_value(srow[ngroups == 1 ? 0 : base / g], SCALE_BF16);
#pragma unroll
        for (int i = 0; i < 32; ++i) v[i] = fmul_rn(v[i], s);  // exact product (SPEC 2), kept if subnormal
    } else {  // groups not aligned to chunks: walk the group boundaries
        u32 gi = base / g, next = (gi + 1) * g;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            if (base + i >= next) { ++gi; next += g; }
            v[i] = fmul_rn(v[i], scale_value(srow[gi < ngroups ? gi : ngroups - 1], SCALE_BF16));
        }
    }

    const size_t o = (size_t)row * k + base;  // first output element
    const bool full = base + 32 <= k;
    if constexpr (OUT == 2) {
        float* dst = (float*)out + o;
        if (full && k % 4 == 0) {  // 16-byte aligned float4 stores
#pragma unroll
            for (int i = 0; i < 32; i += 4)
                st_stream16((uint4*)(dst + i), make_uint4(__float_as_uint(v[i]), __float_as_uint(v[i + 1]),
                                                          __float_as_uint(v[i + 2]), __float_as_uint(v[i + 3])));
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) if (base + i < k) dst[i] = v[i];
        }
    } else {
        uint4 w[4];  // the chunk's 32 outputs, 8 per 16-byte word
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            w[i].x = pack2<OUT>(v[8 * i], v[8 * i + 1]);
            w[i].y = pack2<OUT>(v[8 * i + 2], v[8 * i + 3]);
            w[i].z = pack2<OUT>(v[8 * i + 4], v[8 * i + 5]);
            w[i].w = pack2<OUT>(v[8 * i + 6], v[8 * i + 7]);
        }
        u16* dst = (u16*)out + o;
        const u32 lane = threadIdx.x & 31;
        if (k % 32 == 0 && u - lane + 32 <= rows * cpr) {  // the warp's 32 units all real
            // Stage the warp's 32 chunks in shared memory (5 words per lane: conflict-free writes),
            // then store its 16-byte words j = lane + 32*s (lane j/4's word j%4) so that each store
            // instruction writes whole runs: row order, the warp's 32 chunks are 2 KB of the output
            // in a row (rows are whole chunks); tile order, lanes 4r..4r+3 hold 128 elements of one
            // row, 256 contiguous bytes.
            __shared__ uint4 stage[DEQUANT_BLOCK / 32][32 * 5];
            uint4* st = stage[threadIdx.x >> 5];
#pragma unroll
            for (int i = 0; i < 4; ++i) st[5 * lane + i] = w[i];
            __syncwarp();
            // lane 0's first output element: row order, (u - lane) * 32 = row * k + base of lane 0;
            // tile order, lane 4r's is r rows on from lane 0's
            u16* o0 = (u16*)out + (TILED ? o - (size_t)(lane >> 2) * k - 32 * (lane & 3) : (size_t)(u - lane) * 32);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const u32 j = lane + 32 * s;
                uint4* wdst = TILED ? (uint4*)(o0 + (size_t)(j >> 4) * k) + (j & 15) : (uint4*)o0 + j;
                st_stream16(wdst, st[5 * (j >> 2) + (j & 3)]);
            }
        } else if (full && k % 8 == 0) {  // 16-byte aligned stores of 8 values
#pragma unroll
            for (int i = 0; i < 4; ++i) st_stream16((uint4*)(dst + 8 * i), w[i]);
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const u32 word = i & 7;  // element i: word i/8, 16-bit half (i%8)
                const u32 x = word < 2 ? w[i >> 3].x : word < 4 ? w[i >> 3].y : word < 6 ? w[i >> 3].z : w[i >> 3].w;
                if (base + i < k) dst[i] = (u16)(x >> (16 * (i & 1)));  // half i%2 of the 32-bit word
            }
        }
    }
}

template <bool SCALE_BF16, int OUT>
__device__ __forceinline__ void dequant(const u8* __restrict__ payload, const u16* __restrict__ scales,
                                        void* __restrict__ out, u32 rows, u32 k, u32 stride,
                                        u32 ngroups, u32 g) {
    const u32 cpr = (k + 31) / 32;
    const u32 total = rows * cpr;  // the host keeps rows * cpr < 2^32
    const u32 u0 = blockIdx.x * (DEQUANT_BLOCK * DEQUANT_UNITS) + threadIdx.x;
    Chunk ch[DEQUANT_UNITS];  // every load first: UNITS chunks in flight per thread
#pragma unroll
    for (int i = 0; i < DEQUANT_UNITS; ++i)
        if (u0 + i * DEQUANT_BLOCK < total) ch[i] = load_unit(payload, u0 + i * DEQUANT_BLOCK, cpr, k, stride);
#pragma unroll
    for (int i = 0; i < DEQUANT_UNITS; ++i)
        if (u0 + i * DEQUANT_BLOCK < total)
            dequant_unit<SCALE_BF16, OUT>(ch[i], u0 + i * DEQUANT_BLOCK, scales, out, rows, k, ngroups, g);
}

}  // namespace

#define EXMY_DEQUANT_KERNEL(NAME, SBF, OUT)                                                             \
    extern "C" __global__ void __launch_bounds__(DEQUANT_BLOCK, DEQUANT_MIN_BLOCKS) NAME(                               \
        const u8* __restrict__ payload, const u16* __restrict__ scales, void* __restrict__ out,       \
        u32 rows, u32 k, u32 stride, u32 ngroups, u32 g) {                                             \
        dequant<SBF, OUT>(payload, scales, out, rows, k, stride, ngroups, g);                          \
    }

EXMY_DEQUANT_KERNEL(exmy_dequant_s16_o16, false, 0)
EXMY_DEQUANT_KERNEL(exmy_dequant_s16_obf, false, 1)
EXMY_DEQUANT_KERNEL(exmy_dequant_s16_o32, false, 2)
EXMY_DEQUANT_KERNEL(exmy_dequant_sbf_o16, true, 0)
EXMY_DEQUANT_KERNEL(exmy_dequant_sbf_obf, true, 1)
EXMY_DEQUANT_KERNEL(exmy_dequant_sbf_o32, true, 2)
