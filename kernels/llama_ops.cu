// Fused element-wise steps of one Llama decoder layer (src/exmyconv/bench/e2e.py, fused=True).
// fp16 in and out, float32 arithmetic. They replace ~20 small torch kernels per layer and reproduce
// torch's fp16 rounding (every torch fp16 op computes in float32 and rounds once to fp16):
//
// llama_add_rms_norm   one block per batch row, blockDim a multiple of 32 (<= 1024), hidden <= 16 blockDim;
//     each thread holds 8 consecutive elements per slot (16-byte loads and stores when aligned).
//     h[b] <- fp16(h[b] + delta[b]) (skipped when has_delta == 0), then
//     out[b] = fp16(w * (rstd * h[b])) with rstd = rsqrt(mean(h[b]^2) + eps), which is what torch's
//     fused CUDA rms_norm computes for fp16. The residual add is bit-exact; the norm may differ from
//     torch by 1 fp16 ulp where the float32 sum of squares, summed in another order, differs.
// llama_rope_cache     one thread per (row b, head, i < hd/2) of qkv [B, (Hq + 2 Hkv) hd]
//     (q heads, k heads, v heads). Rotate-half rotary embedding at position *pos (read on the
//     device, so the launch can live in a CUDA graph) with tables cos/sin [max_len, hd]:
//       o[i]        = fp16(fp16(x[i] cos[i])      + fp16(-x[i+h] sin[i]))
//       o[i + hd/2] = fp16(fp16(x[i+h] cos[i+h])  + fp16(x[i] sin[i+h]))
//     i.e. torch's x * cos + cat(-x2, x1) * sin op by op: bit-exact. q -> q_out [B, Hq, hd],
//     k -> k_cache[b, kvh, pos, :], v (copied) -> v_cache[b, kvh, pos, :]; caches [B, Hkv, max_len, hd].
//     A position outside [0, max_len) writes nothing.
// llama_silu_mul       one thread per output element: gu [B, 2I] -> out [B, I],
//     out = fp16(fp16(silu(a)) * b), silu(a) = a / (1 + exp(-a)) as torch's CUDA silu computes it
//     (expf and IEEE division; nothing here is built with fast math): bit-exact.
// llama_rope_attend    blocks of 512 threads per (row b, KV head) x `splits` runs of `chunk` positions:
//     llama_rope_cache's work for the block's g = Hq / Hkv query heads and its k and v head (the same
//     arithmetic, bit-exact; split 0 writes the cache row, every split keeps it in shared memory), then
//     attention of those g queries over cache positions 0 .. pos (L = min(pos + 1, max_len); none when
//     pos < 0: zeros), into out [B, Hq, hd] (query head kvh*g + h, as SDPA's grouped-query layout).
//     Scores q.k / sqrt(hd) and the softmax in float32, online: warp w of 16 takes head w % g and
//     every (16/g)-th position of its split, four at a time (their k and v rows load together); the
//     warps' partial sums merge in the block, the splits' in `work`, by the split that finishes last
//     (an atomic count per (b, KV head), left at 0 for the next launch). Output rounded once to fp16.
//     Needs g in {1, 2, 4, 8, 16} and hd a multiple of 32 up to 256 (the host falls back to
//     llama_rope_cache + torch's SDPA otherwise). Not bit-exact against SDPA (another summation order;
//     flash kernels also round the probabilities to fp16): within float noise of it.
// llama_argmax_advance one block per batch row of logits [B, vocab]: tok[b] = index of the first
//     maximum (a NaN counts as larger than any number, as torch.argmax), then block 0 adds 1 to
//     *pos (the step's last two torch ops, argmax + copy_ and pos += 1, in one launch).
// fp16 values travel as raw bits (no cuda_fp16.h: NVRTC needs no headers); conversions in PTX
typedef unsigned short f16;
__device__ __forceinline__ float h2f(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ f16 f2h(float f) {  // round to nearest even, as torch's casts
    f16 x;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    return x;
}

// Programmatic dependent launch (src/exmyconv/cuda/launch.py; no-ops for a plain launch): every kernel
// waits for the previous one (whose output it reads) before touching memory, and only then lets the
// next one start launching. Releasing first let a GEMV -> op -> GEMV chain run three grids at once,
// and the decoder's CUDA graph then did not replay its eager step (docs/kernels.md).
__device__ __forceinline__ void pdl_enter() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#define RMS_SLOTS 2  // slots of 8 consecutive elements per thread: hidden <= 16 * blockDim, the row
                     // stays in registers and all its loads are in flight at once

// fp16 pair word <-> floats (lane 0 = bits 15..0)
__device__ __forceinline__ float lo_f(unsigned int x) { return h2f((f16)(x & 0xFFFFu)); }
__device__ __forceinline__ float hi_f(unsigned int x) { return h2f((f16)(x >> 16)); }

extern "C" __global__ void llama_add_rms_norm(f16* __restrict__ h, const f16* __restrict__ delta,
                                              const f16* __restrict__ w, f16* __restrict__ out,
                                              int hidden, int has_delta, float eps) {
    pdl_enter();
    __shared__ float partial[32];
    const long row = (long)blockIdx.x * hidden;
    f16* hr = h + row;
    const f16* dr = delta + row;
    // 16-byte loads when every row starts 16-byte aligned; else element by element
    const bool vec = (hidden & 7) == 0 && ((((size_t)h | (size_t)delta | (size_t)w | (size_t)out) & 15) == 0);
    float v[RMS_SLOTS][8];
    float wv[RMS_SLOTS][8];  // the norm weights, loaded with the row (not after the reduction)
    float ss = 0.0f;
#pragma unroll
    for (int s = 0; s < RMS_SLOTS; ++s) {
        const int base = 8 * (threadIdx.x + s * blockDim.x);
        if (vec && base + 8 <= hidden) {
            uint4 hx = *(const uint4*)(hr + base);
            const uint4 wx = *(const uint4*)(w + base);
            unsigned int* hp = &hx.x;
            const unsigned int* wp = &wx.x;
            if (has_delta) {
                const uint4 dx = *(const uint4*)(dr + base);
                const unsigned int* dp = &dx.x;
#pragma unroll
                for (int t = 0; t < 4; ++t)  // fp16(h + delta), both lanes
                    hp[t] = (unsigned int)f2h(__fadd_rn(lo_f(hp[t]), lo_f(dp[t]))) |
                            ((unsigned int)f2h(__fadd_rn(hi_f(hp[t]), hi_f(dp[t]))) << 16);
                *(uint4*)(hr + base) = hx;
            }
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                v[s][2 * t] = lo_f(hp[t]);
                v[s][2 * t + 1] = hi_f(hp[t]);
                wv[s][2 * t] = lo_f(wp[t]);
                wv[s][2 * t + 1] = hi_f(wp[t]);
            }
        } else {
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const int i = base + t;
                v[s][t] = wv[s][t] = 0.0f;
                if (i < hidden) {
                    f16 x = hr[i];
                    if (has_delta) {
                        x = f2h(__fadd_rn(h2f(x), h2f(dr[i])));
                        hr[i] = x;
                    }
                    v[s][t] = h2f(x);
                    wv[s][t] = h2f(w[i]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < 8; ++t) ss = fmaf(v[s][t], v[s][t], ss);  // elements past the row are 0
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < warps ? partial[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) partial[0] = ss;
    }
    __syncthreads();
    const float rstd = rsqrtf(partial[0] / (float)hidden + eps);
#pragma unroll
    for (int s = 0; s < RMS_SLOTS; ++s) {
        const int base = 8 * (threadIdx.x + s * blockDim.x);
        f16 o[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) o[t] = f2h(__fmul_rn(wv[s][t], __fmul_rn(rstd, v[s][t])));
        if (vec && base + 8 <= hidden) {
            uint4 ox;
            ox.x = o[0] | ((unsigned int)o[1] << 16);
            ox.y = o[2] | ((unsigned int)o[3] << 16);
            ox.z = o[4] | ((unsigned int)o[5] << 16);
            ox.w = o[6] | ((unsigned int)o[7] << 16);
            *(uint4*)(out + row + base) = ox;
        } else {
#pragma unroll
            for (int t = 0; t < 8; ++t)
                if (base + t < hidden) out[row + base + t] = o[t];
        }
    }
}

// Rotary embedding of pair i of one head row x at position pos (tables cos/sin of that position):
// torch's x * cos + cat(-x2, x1) * sin op by op, each product rounded to fp16 on its own.
__device__ __forceinline__ void rope_pair(const f16* x, const f16* c, const f16* s, int i, int half, f16& o1, f16& o2) {
    const float f1 = h2f(x[i]), f2 = h2f(x[i + half]);
    const float a1 = h2f(f2h(__fmul_rn(f1, h2f(c[i]))));
    const float b1 = h2f(f2h(__fmul_rn(-f2, h2f(s[i]))));
    const float a2 = h2f(f2h(__fmul_rn(f2, h2f(c[i + half]))));
    const float b2 = h2f(f2h(__fmul_rn(f1, h2f(s[i + half]))));
    o1 = f2h(__fadd_rn(a1, b1));
    o2 = f2h(__fadd_rn(a2, b2));
}

extern "C" __global__ void llama_rope_cache(const f16* __restrict__ qkv, const f16* __restrict__ cos_t,
                                            const f16* __restrict__ sin_t, const long long* __restrict__ pos_p,
                                            f16* __restrict__ q_out, f16* __restrict__ k_cache,
                                            f16* __restrict__ v_cache, int batch, int hq, int hkv, int hd,
                                            int max_len) {
    pdl_enter();
    const int half = hd >> 1, heads = hq + 2 * hkv;
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)batch * heads * half) return;
    const long long pos = *pos_p;
    if (pos < 0 || pos >= max_len) return;
    const int i = (int)(idx % half);
    const int head = (int)((idx / half) % heads);
    const int b = (int)(idx / ((long)half * heads));
    const f16* x = qkv + ((long)b * heads + head) * hd;
    const f16 x1 = x[i], x2 = x[i + half];
    if (head >= hq + hkv) {  // v: copied into the cache as is
        f16* dst = v_cache + (((long)b * hkv + (head - hq - hkv)) * max_len + pos) * hd;
        dst[i] = x1;
        dst[i + half] = x2;
        return;
    }
    f16 o1, o2;
    rope_pair(x, cos_t + pos * hd, sin_t + pos * hd, i, half, o1, o2);
    f16* dst = head < hq ? q_out + ((long)b * hq + head) * hd
                            : k_cache + (((long)b * hkv + (head - hq)) * max_len + pos) * hd;
    dst[i] = o1;
    dst[i + half] = o2;
}

extern "C" __global__ void llama_silu_mul(const f16* __restrict__ gu, f16* __restrict__ out, int batch,
                                          int inter) {
    pdl_enter();
    const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)batch * inter) return;
    const long b = idx / inter, j = idx % inter;
    const float a = h2f(gu[b * 2 * inter + j]);
    const float g = h2f(gu[b * 2 * inter + inter + j]);
    const float s = h2f(f2h(a / (1.0f + expf(-a))));
    out[idx] = f2h(__fmul_rn(s, g));
}

#define ATT_WARPS 16
#define ATT_MAXG 16    // query heads per KV head
#define ATT_MAXD 8     // head dims per lane (hd <= 256)
#define ATT_UNROLL 4   // positions per step of a warp: their k and v rows load together, one latency

// d consecutive fp16 of p (2d-byte aligned) as raw pair words w[0..3] (element e in word e / 2, low
// half first); words past d zero (they meet zero q entries: 0 * garbage may be NaN)
__device__ __forceinline__ void load_row(const f16* p, int d, unsigned int (&w)[ATT_MAXD / 2]) {
    if (d == 4) {
        const uint2 u = *(const uint2*)p;
        w[0] = u.x; w[1] = u.y; w[2] = w[3] = 0u;
    } else if (d == 8) {
        const uint4 u = *(const uint4*)p;
        w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
    } else if (d == 2) {
        w[0] = *(const unsigned int*)p; w[1] = w[2] = w[3] = 0u;
    } else {
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 2; ++i)
            w[i] = (2 * i < d ? (unsigned int)p[2 * i] : 0u) | (2 * i + 1 < d ? (unsigned int)p[2 * i + 1] << 16 : 0u);
    }
}
__device__ __forceinline__ float elem(const unsigned int (&w)[ATT_MAXD / 2], int e) {
    return (e & 1) ? hi_f(w[e >> 1]) : lo_f(w[e >> 1]);
}

// e^(m - M) for merging a partial softmax with running max m into one with max M >= m; 0 for an
// empty partial (m = -inf), also when M is -inf (nothing anywhere)
__device__ __forceinline__ float rescale(float m, float M) {
    return m == -__int_as_float(0x7f800000) ? 0.f : expf(m - M);
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
llama_rope_attend(const f16* __restrict__ qkv, const f16* __restrict__ cos_t, const f16* __restrict__ sin_t,
                  const long long* __restrict__ pos_p, f16* __restrict__ k_cache, f16* __restrict__ v_cache,
                  f16* __restrict__ out, float* __restrict__ work, unsigned int* __restrict__ count, int hq,
                  int hkv, int hd, int max_len, int chunk, int splits) {
    pdl_enter();
    __shared__ float qs[ATT_MAXG * 256];                  // the block's rotated queries
    __shared__ __align__(16) unsigned int knew[128], vnew[128];  // position pos: rotated k, v (pair words)
    __shared__ float pm[ATT_WARPS], pl[ATT_WARPS];        // per warp: running max, sum of exp
    __shared__ float pacc[ATT_WARPS][256];                // per warp: unnormalised output of its head
    __shared__ bool last;
    const int bk = blockIdx.x / splits, sp = blockIdx.x % splits;  // (row, KV head), split of the positions
    const int b = bk / hkv, kvh = bk % hkv, g = hq / hkv, half = hd >> 1;
    const int heads = hq + 2 * hkv;
    const long long pos = *pos_p;
    const bool in = pos >= 0 && pos < max_len;
    const f16* row = qkv + (long)b * heads * hd;
    f16* knew_h = (f16*)knew;
    f16* vnew_h = (f16*)vnew;
    // 1. rotary q (g heads) and k, v copied: (g + 2) * half pairs, into shared memory; split 0
    //    writes k and v into the caches (the other splits read position pos from here, not from
    //    the cache split 0 is writing)
    for (int t = threadIdx.x; t < (g + 2) * half; t += blockDim.x) {
        const int u = t / half, i = t % half;
        if (!in) {  // no table row: nothing is written and the queries are not used
            if (u < g) qs[u * hd + i] = qs[u * hd + i + half] = 0.f;
            continue;
        }
        f16 o1, o2;
        if (u == g + 1) {  // v
            const f16* x = row + (long)(hq + hkv + kvh) * hd;
            o1 = x[i];
            o2 = x[i + half];
        } else {
            const f16* x = row + (long)(u < g ? kvh * g + u : hq + kvh) * hd;
            rope_pair(x, cos_t + pos * hd, sin_t + pos * hd, i, half, o1, o2);
        }
        if (u < g) {
            qs[u * hd + i] = h2f(o1);
            qs[u * hd + i + half] = h2f(o2);
            continue;
        }
        f16* sm = u == g ? knew_h : vnew_h;
        sm[i] = o1;
        sm[i + half] = o2;
        if (sp == 0) {
            f16* dst = (u == g ? k_cache : v_cache) + (((long)b * hkv + kvh) * max_len + pos) * hd;
            dst[i] = o1;
            dst[i + half] = o2;
        }
    }
    __syncthreads();
    // 2. attention over this split's positions [j_begin, j_end): warp w takes head h = w % g and
    //    positions j_begin + r, + R, ... (r = w / g, R = 16 / g)
    const long long L = pos < 0 ? 0 : (pos + 1 < max_len ? pos + 1 : max_len);
    const long long j_begin = (long long)sp * chunk;
    const long long j_end = j_begin + chunk < L ? j_begin + chunk : L;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, d = hd >> 5;
    const int h = warp % g, r = warp / g, R = ATT_WARPS / g;
    const float scale = 1.f / sqrtf((float)hd);  // SDPA's default scale
    float q[ATT_MAXD], acc[ATT_MAXD];
#pragma unroll
    for (int e = 0; e < ATT_MAXD; ++e) {
        q[e] = e < d ? qs[h * hd + lane * d + e] : 0.f;
        acc[e] = 0.f;
    }
    float m = -__int_as_float(0x7f800000), l = 0.f;
    const f16* kb = k_cache + ((long)b * hkv + kvh) * max_len * hd + lane * d;
    const f16* vb = v_cache + ((long)b * hkv + kvh) * max_len * hd + lane * d;
    for (long long j0 = j_begin + r; j0 < j_end; j0 += (long long)R * ATT_UNROLL) {
        unsigned int kw[ATT_UNROLL][ATT_MAXD / 2], vw[ATT_UNROLL][ATT_MAXD / 2];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            const long long j = j0 + (long long)u * R;
            if (j < j_end) {
                load_row(j == pos ? knew_h + lane * d : kb + j * hd, d, kw[u]);
                load_row(j == pos ? vnew_h + lane * d : vb + j * hd, d, vw[u]);
            } else {
#pragma unroll
                for (int i = 0; i < ATT_MAXD / 2; ++i) kw[u][i] = vw[u][i] = 0u;
            }
        }
        float sc[ATT_UNROLL];
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < ATT_MAXD; ++e) dot = fmaf(q[e], elem(kw[u], e), dot);
            sc[u] = dot;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < ATT_UNROLL; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
        float mn = m;
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            sc[u] = j0 + (long long)u * R < j_end ? sc[u] * scale : -__int_as_float(0x7f800000);
            mn = fmaxf(mn, sc[u]);
        }
        const float f = rescale(m, mn);
        l *= f;
#pragma unroll
        for (int e = 0; e < ATT_MAXD; ++e) acc[e] *= f;
#pragma unroll
        for (int u = 0; u < ATT_UNROLL; ++u) {
            const float p = rescale(sc[u], mn);  // positions past the split: 0
            l += p;
#pragma unroll
            for (int e = 0; e < ATT_MAXD; ++e) acc[e] = fmaf(p, elem(vw[u], e), acc[e]);
        }
        m = mn;
    }
    if (lane == 0) { pm[warp] = m; pl[warp] = l; }
#pragma unroll
    for (int e = 0; e < ATT_MAXD; ++e)
        if (e < d) pacc[warp][lane * d + e] = acc[e];
    __syncthreads();
    // 3. merge the R warps of each head: acc = sum_w acc_w e^(m_w - M), l = sum_w l_w e^(m_w - M);
    //    one split: out = acc / l; several: the split's (M, l, acc) into work, and the split that
    //    finishes last merges them all the same way (its count back to 0 for the next launch)
    const long wbase = (long)bk * splits * g * (hd + 2);
    for (int t = threadIdx.x; t < g * hd; t += blockDim.x) {
        const int hh = t / hd, e = t % hd;
        float mm = -__int_as_float(0x7f800000);
        for (int w = hh; w < ATT_WARPS; w += g) mm = fmaxf(mm, pm[w]);
        float num = 0.f, den = 0.f;
        for (int w = hh; w < ATT_WARPS; w += g) {
            const float f = rescale(pm[w], mm);
            num = fmaf(pacc[w][e], f, num);
            den = fmaf(pl[w], f, den);
        }
        if (splits == 1) {
            out[((long)b * hq + kvh * g + hh) * hd + e] = f2h(den > 0.f ? num / den : 0.f);
        } else {
            float* ws = work + wbase + ((long)sp * g + hh) * (hd + 2);
            ws[e] = num;
            if (e == 0) { ws[hd] = mm; ws[hd + 1] = den; }
        }
    }
    if (splits == 1) return;
    __threadfence();  // this split's partials visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(count + bk, 1u) == (unsigned int)splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    for (int t = threadIdx.x; t < g * hd; t += blockDim.x) {
        const int hh = t / hd, e = t % hd;
        const volatile float* ws = work + wbase + (long)hh * (hd + 2);
        float mm = -__int_as_float(0x7f800000);
        for (int k = 0; k < splits; ++k) mm = fmaxf(mm, ws[(long)k * g * (hd + 2) + hd]);
        float num = 0.f, den = 0.f;
        for (int k = 0; k < splits; ++k) {
            const volatile float* wk = ws + (long)k * g * (hd + 2);
            const float f = rescale(wk[hd], mm);
            num = fmaf(wk[e], f, num);
            den = fmaf(wk[hd + 1], f, den);
        }
        out[((long)b * hq + kvh * g + hh) * hd + e] = f2h(den > 0.f ? num / den : 0.f);
    }
    if (threadIdx.x == 0) count[bk] = 0u;
}

// (v, i) beats (bv, bi): NaN first, then the larger value, then the smaller index.
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) {
    const bool n = v != v, bn = bv != bv;
    if (n != bn) return n;
    return (!n && v > bv) || ((n || v == bv) && i < bi);
}

extern "C" __global__ void llama_argmax_advance(const f16* __restrict__ logits, int vocab,
                                                long long* __restrict__ tok, long long* __restrict__ pos) {
    pdl_enter();
    __shared__ float sv[32];
    __shared__ int si[32];
    const f16* row = logits + (long)blockIdx.x * vocab;
    float bv = -__int_as_float(0x7f800000);  // -inf: any number or NaN beats (bv, bi) below
    int bi = 0x7fffffff;
    if ((vocab & 7) == 0 && ((unsigned long long)logits & 15) == 0) {
        // 16-byte loads, eight in flight per thread: a row of 128256 logits is 256 KB, and one
        // block reading it two bytes at a time took ~50 us (H100), latency-bound
        const uint4* r4 = (const uint4*)row;
#pragma unroll 8
        for (int j = threadIdx.x; j < vocab / 8; j += blockDim.x) {
            const uint4 u = r4[j];
            const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const float v0 = lo_f(w[q]), v1 = hi_f(w[q]);
                if (beats(v0, 8 * j + 2 * q, bv, bi)) { bv = v0; bi = 8 * j + 2 * q; }
                if (beats(v1, 8 * j + 2 * q + 1, bv, bi)) { bv = v1; bi = 8 * j + 2 * q + 1; }
            }
        }
    } else {
#pragma unroll 4
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = h2f(row[i]);
            if (beats(v, i, bv, bi)) { bv = v; bi = i; }
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (beats(v, i, bv, bi)) { bv = v; bi = i; }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        bv = lane < warps ? sv[lane] : -__int_as_float(0x7f800000);
        bi = lane < warps ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float v = __shfl_xor_sync(0xffffffffu, bv, o);
            const int i = __shfl_xor_sync(0xffffffffu, bi, o);
            if (beats(v, i, bv, bi)) { bv = v; bi = i; }
        }
        if (lane == 0) {
            tok[blockIdx.x] = bi;
            if (blockIdx.x == 0 && pos) *pos += 1;
        }
    }
}
