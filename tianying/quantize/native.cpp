// Weight-only int8 / int4 matrix-vector kernels for CPU decoding (see native.py for why they exist).
//
// y[M, N] = x[M, K] · Ŵᵀ; Ŵ is never materialised for small M.
//   int8, per output row n:   Ŵ[n, k] = s[n] · (w[n, k] + o[n])        w = q − 128 (int8), o = 128 − z
//   int4, per row n, group g: Ŵ[n, k] = s[n, g] · (q[n, k] − z[n, g])  q ∈ [0, 15], s fp16, z uint8
// Activations are rounded to int16 per block (see quantize_act), so the products and their sums over a
// block are exact integers (vpmaddwd: 16 multiply-adds per instruction) and only the block results are
// scaled in fp32. Layouts interleave 8 output rows so that each thread reads its share of the weights as
// one sequential stream and accumulates 8 outputs in one vector (no horizontal sums); int4 scales
// s[N/8][G][8] (fp16 bits) and zeros z[N/8][G][8] (uint8) are interleaved the same way.
// Large M is served by the dequantize functions and a BLAS GEMM (the caller chunks the rows).
// Compiled by native.py with -O3 -fopenmp (and -mavx2 -mfma -mf16c where the CPU has them); the scalar
// path is the same arithmetic for other CPUs. OpenMP resolves to the runtime torch already loaded.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TY_AVX2 1
#endif

namespace {

inline float half_to_float(uint16_t h) {
#ifdef TY_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

// ------------------------------------------------------------------------------------------ activations
// Activations are rounded to int16 per block of kb columns: xq = round(x / sx), sx = max|x| / 32767, so
// |x − sx·xq| ≤ sx / 2 (relative 2⁻¹⁶ of the block's largest value, far below the weights' rounding).
// Products then sum exactly in int32: |Σ xq·w| over a block ≤ kb · 32767 · 128 < 2³¹ for kb ≤ 256.
struct Act {
    std::vector<int16_t> q;   // [MB][K]
    std::vector<float> scale;  // [MB][K / kb]
    std::vector<int32_t> sum;  // [MB][K / kb]: Σ xq over the block
};

// perm (act-order, may be null): stored column k reads input column perm[k]
void quantize_act(const float* x, long M, long K, long kb, Act& a, const int64_t* perm = nullptr) {
    const long nb = K / kb;
    a.q.resize(M * K);
    a.scale.resize(M * nb);
    a.sum.resize(M * nb);
    std::vector<float> gathered;
    if (perm) {
        gathered.resize(M * K);
        for (long m = 0; m < M; m++)
            for (long k = 0; k < K; k++) gathered[m * K + k] = x[m * K + perm[k]];
        x = gathered.data();
    }
    for (long m = 0; m < M; m++)
        for (long b = 0; b < nb; b++) {
            const float* xb = x + m * K + b * kb;
            float amax = 0.f;
            for (long k = 0; k < kb; k++) amax = std::max(amax, std::fabs(xb[k]));
            const float inv = amax > 0.f ? 32767.f / amax : 0.f;
            int32_t sum = 0;
            for (long k = 0; k < kb; k++) {
                const int16_t v = (int16_t)std::nearbyint(xb[k] * inv);
                a.q[m * K + b * kb + k] = v;
                sum += v;
            }
            a.scale[m * nb + b] = amax / 32767.f;
            a.sum[m * nb + b] = sum;
        }
}

#ifdef TY_AVX2
inline __m256i pair(const int16_t* p) {  // broadcast two consecutive int16 as one int32
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}
#endif

// ------------------------------------------------------------------------------------------ int8
// Layout "x8p": w[N/8][K/2][8][2]: byte ((j·8 + r)·2 + t) = row 8b + r, column 2j + t, so one 16-byte load
// sign-extends to the int16 pairs (row r: columns 2j, 2j+1) that vpmaddwd multiplies with an activation pair.
template <int MB>
void i8_block(const Act& a, long K, long kb, const int8_t* wb, const float* s, const float* o, float* y, long N) {
    const long nb = K / kb;
#ifdef TY_AVX2
    __m256 tot[MB];
    for (int m = 0; m < MB; m++) tot[m] = _mm256_setzero_ps();
    const __m256 vo = o ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        __m256i acc[MB];
        for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_si256();
        for (long k = b * kb; k < (b + 1) * kb; k += 2) {
            const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * 8)));
            for (int m = 0; m < MB; m++)
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(w, pair(a.q.data() + m * K + k)));
        }
        for (int m = 0; m < MB; m++) {
            __m256 d = _mm256_cvtepi32_ps(acc[m]);
            if (o) d = _mm256_fmadd_ps(vo, _mm256_set1_ps((float)a.sum[m * nb + b]), d);
            tot[m] = _mm256_fmadd_ps(d, _mm256_set1_ps(a.scale[m * nb + b]), tot[m]);
        }
    }
    const __m256 vs = _mm256_loadu_ps(s);
    for (int m = 0; m < MB; m++) _mm256_storeu_ps(y + m * N, _mm256_mul_ps(vs, tot[m]));
#else
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < 8; r++) {
            float tot = 0.f;
            for (long b = 0; b < nb; b++) {
                int32_t acc = 0;
                for (long k = b * kb; k < (b + 1) * kb; k += 2)
                    acc += (int32_t)wb[k * 8 + 2 * r] * a.q[m * K + k] + (int32_t)wb[k * 8 + 2 * r + 1] * a.q[m * K + k + 1];
                float d = (float)acc;
                if (o) d += o[r] * (float)a.sum[m * nb + b];
                tot += d * a.scale[m * nb + b];
            }
            y[m * N + r] = s[r] * tot;
        }
#endif
}

// ------------------------------------------------------------------------------------------ int4
// Layout "x8q": w[N/8][K/4][8][2]: byte ((j·8 + r)·2 + t) = q[8b + r, 4j + t] | q[8b + r, 4j + 2 + t] << 4,
// so the low nibbles of one 16-byte load are the int16 pairs (columns 4j, 4j+1) and the high ones (4j+2, 4j+3).
template <int MB>
void i4_block(const Act& a, long K, long kb, const uint8_t* wb, const uint16_t* sb, const uint8_t* zb, long G,
              float* y, long N) {
    const long nb = K / kb, gs = K / G;
#ifdef TY_AVX2
    const __m256i lowmask = _mm256_set1_epi16(0x0f);
    __m256 tot[MB];
    for (int m = 0; m < MB; m++) tot[m] = _mm256_setzero_ps();
    __m256 vs = _mm256_setzero_ps();
    __m256i vz = _mm256_setzero_si256();
    for (long b = 0; b < nb; b++) {
        const long g = b * kb / gs;
        if (b * kb % gs == 0) {
            vs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
            vz = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zb + g * 8)));
        }
        __m256i acc[MB];
        for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_si256();
        for (long k = b * kb; k < (b + 1) * kb; k += 4) {
            const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * 4)));
            const __m256i lo = _mm256_and_si256(v, lowmask), hi = _mm256_srli_epi16(v, 4);
            for (int m = 0; m < MB; m++) {
                const int16_t* xq = a.q.data() + m * K + k;
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(lo, pair(xq)));
                acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(hi, pair(xq + 2)));
            }
        }
        for (int m = 0; m < MB; m++) {  // s·sx·(Σ xq·q − z·Σ xq), exact in int32 up to the scaling
            const __m256i d = _mm256_sub_epi32(acc[m], _mm256_mullo_epi32(vz, _mm256_set1_epi32(a.sum[m * nb + b])));
            tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(vs, _mm256_set1_ps(a.scale[m * nb + b])),
                                     tot[m]);
        }
    }
    for (int m = 0; m < MB; m++) _mm256_storeu_ps(y + m * N, tot[m]);
#else
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < 8; r++) {
            float tot = 0.f;
            for (long b = 0; b < nb; b++) {
                const long g = b * kb / gs;
                int32_t acc = 0;
                for (long k = b * kb; k < (b + 1) * kb; k += 4)
                    for (int t = 0; t < 2; t++) {
                        const uint8_t v = wb[k * 4 + 2 * r + t];
                        acc += (int32_t)(v & 15) * a.q[m * K + k + t] + (int32_t)(v >> 4) * a.q[m * K + k + 2 + t];
                    }
                acc -= (int32_t)zb[g * 8 + r] * a.sum[m * nb + b];
                tot += (float)acc * (half_to_float(sb[g * 8 + r]) * a.scale[m * nb + b]);
            }
            y[m * N + r] = tot;
        }
#endif
}

// A projection's operands (see the layouts above); o: int8 offsets (or null), z: int4 zeros, perm: act-order
// column order (or null).
struct Proj {
    const void* w;
    const void* s;
    const void* o;
    const uint8_t* z;
    long N8, K, kb, G;
    int int8;
    const int64_t* perm;
};

// Called by every thread of an enclosing parallel region (orphaned worksharing): rows of 8 outputs split
// statically between the threads; the implicit barrier at the end of `omp for` ends the call.
template <int MB>
void gemm_rows(const Act& a, const Proj& p, float* y) {
#pragma omp for schedule(static)
    for (long b = 0; b < p.N8 / 8; b++) {
        if (p.int8)
            i8_block<MB>(a, p.K, p.kb, static_cast<const int8_t*>(p.w) + b * p.K * 8,
                         static_cast<const float*>(p.s) + b * 8, p.o ? static_cast<const float*>(p.o) + b * 8 : nullptr,
                         y + b * 8, p.N8);
        else
            i4_block<MB>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + b * p.K * 4,
                         static_cast<const uint16_t*>(p.s) + b * p.G * 8, p.z + b * p.G * 8, p.G, y + b * 8, p.N8);
    }
}

// y [M, N8] = x [M, K] · Ŵᵀ inside a parallel region; `a` is shared scratch (one thread rounds the activations).
void gemm_region(const float* x, long M, const Proj& p, float* y, Act& a) {
    for (long m0 = 0; m0 < M;) {
        const long left = M - m0;
        const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
#pragma omp single
        quantize_act(x + m0 * p.K, mb, p.K, p.kb, a, p.perm);
        float* ym = y + m0 * p.N8;
        if (mb == 8) gemm_rows<8>(a, p, ym);
        else if (mb == 4) gemm_rows<4>(a, p, ym);
        else if (mb == 2) gemm_rows<2>(a, p, ym);
        else gemm_rows<1>(a, p, ym);
        m0 += mb;
    }
}

void gemm(const float* x, long M, const Proj& p, float* y, int nt) {
    Act a;
#pragma omp parallel num_threads(nt)
    gemm_region(x, M, p, y, a);
}

}  // namespace

extern "C" {

// x [M, K] fp32 contiguous; activation block kb (even, divides K, ≤ 256); y [M, N] fp32 with N % 8 == 0.
// int8: w x8p layout, s/o fp32 [N] (o = 128 − z, or null when symmetric).
void ty_gemm_i8(const float* x, long M, long K, long kb, const int8_t* w, const float* s, const float* o, float* y,
                long N, int nt) {
    gemm(x, M, Proj{w, s, o, nullptr, N, K, kb, 1, 1, nullptr}, y, nt);
}

// int4: w x8q layout, s fp16 bits / z uint8 [N/8][G][8]; kb divides the group size K / G and is a multiple of 4.
void ty_gemm_i4(const float* x, long M, long K, long kb, const uint8_t* w, const uint16_t* s, const uint8_t* z,
                long G, float* y, long N, int nt) {
    gemm(x, M, Proj{w, s, nullptr, z, N, K, kb, G, 0, nullptr}, y, nt);
}

// Rows [n0, n1) of Ŵ (n0, n1 multiples of 8) into out [(n1 − n0), K] fp32, with the reference's
// arithmetic: (q − z) · s.
void ty_dequant_i8(const int8_t* w, const float* s, const float* z, long K, long n0, long n1, float* out, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long b = n0 / 8; b < n1 / 8; b++)
        for (int r = 0; r < 8; r++) {
            const long n = b * 8 + r;
            const float zn = z[n], sn = s[n];
            float* o = out + (n - n0) * K;
            for (long k = 0; k < K; k++) o[k] = ((float)w[b * K * 8 + (k / 2) * 16 + 2 * r + k % 2] + 128.f - zn) * sn;
        }
}

void ty_dequant_i4(const uint8_t* w, const uint16_t* sc, const uint8_t* z, long G, long K, long n0, long n1,
                   float* out, int nt) {
    const long gs = K / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long b = n0 / 8; b < n1 / 8; b++)
        for (int r = 0; r < 8; r++) {
            float* o = out + (b * 8 + r - n0) * K;
            for (long k = 0; k < K; k++) {
                const long g = k / gs;
                const float sg = half_to_float(sc[(b * G + g) * 8 + r]), zg = (float)z[(b * G + g) * 8 + r];
                const uint8_t v = w[b * K * 4 + (k / 4) * 16 + 2 * r + k % 2];
                o[k] = ((float)((k % 4) < 2 ? (v & 15) : (v >> 4)) - zg) * sg;
            }
        }
}

}  // extern "C"

// ------------------------------------------------------------------------------------------ decode glue
// The non-matmul parts of one decode step (one new token per row), in fp32, and the whole step.
namespace {

// out[m] = x[m] · rsqrt(eps + Σ x[m]² / D) · w
void rmsnorm(const float* x, const float* w, float eps, float* out, long M, long D) {
    for (long m = 0; m < M; m++) {
        const float* xm = x + m * D;
        float ss = 0.f;
        for (long d = 0; d < D; d++) ss += xm[d] * xm[d];
        const float r = 1.f / std::sqrt(eps + ss * (1.f / (float)D));
        for (long d = 0; d < D; d++) out[m * D + d] = w[d] * (xm[d] * r);
    }
}

// x[m, :D] += y[m, :D], y rows with stride ld
void add_rows(float* x, const float* y, long ld, long M, long D) {
    for (long m = 0; m < M; m++)
        for (long d = 0; d < D; d++) x[m * D + d] += y[m * ld + d];
}

// out[m, f] = silu(g[m, f]) · u[m, f]; g, u rows have stride ld (the kernels' padded width)
void silu_mul(const float* g, const float* u, long ld, float* out, long M, long F) {
    for (long m = 0; m < M; m++)
        for (long f = 0; f < F; f++) {
            const float a = g[m * ld + f];
            out[m * F + f] = a / (1.f + std::exp(-a)) * u[m * ld + f];
        }
}

// Rotary embedding (rotate-half layout) of q [M, H, HD] and k [M, KVH, HD] in place with cos and signed sin
// [HD] (first half negated), and k, v written to the layer's cache [M, KVH, L, HD] at `pos`.
void rope_and_store(float* q, long ldq, float* k, long ldk, const float* v, long ldv, const float* cos,
                    const float* sin, float* kc, float* vc, long M, long H, long KVH, long HD, long L, long pos) {
    const long half = HD / 2;
    for (long m = 0; m < M; m++) {
        for (long h = 0; h < H + KVH; h++) {
            float* t = h < H ? q + m * ldq + h * HD : k + m * ldk + (h - H) * HD;
            float tmp[1024];
            for (long d = 0; d < HD; d++) tmp[d] = t[d];
            for (long d = 0; d < HD; d++) t[d] = tmp[d] * cos[d] + tmp[(d + half) % HD] * sin[d];
        }
        for (long h = 0; h < KVH; h++) {
            std::memcpy(kc + ((m * KVH + h) * L + pos) * HD, k + m * ldk + h * HD, HD * sizeof(float));
            std::memcpy(vc + ((m * KVH + h) * L + pos) * HD, v + m * ldv + h * HD, HD * sizeof(float));
        }
    }
}

// Each query head attends to cache positions 0..pos of its KV head (GQA: consecutive query heads share one);
// out [M, H·HD]. Worksharing over (row, head) inside a parallel region.
void attend_region(const float* q, long ldq, const float* kc, const float* vc, long M, long H, long KVH, long HD,
                   long L, long pos, float* out) {
    const long rep = H / KVH, S = pos + 1;
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<float> p(S);
#pragma omp for schedule(static)
    for (long mh = 0; mh < M * H; mh++) {
        const long m = mh / H, h = mh % H, g = h / rep;
        const float* qh = q + m * ldq + h * HD;
        const float* kh = kc + (m * KVH + g) * L * HD;
        const float* vh = vc + (m * KVH + g) * L * HD;
        float mx = -INFINITY;
        for (long j = 0; j < S; j++) {
            float d = 0.f;
            for (long e = 0; e < HD; e++) d += qh[e] * kh[j * HD + e];
            p[j] = d * scale;
            mx = std::max(mx, p[j]);
        }
        float den = 0.f;
        for (long j = 0; j < S; j++) {
            p[j] = std::exp(p[j] - mx);
            den += p[j];
        }
        float* o = out + m * H * HD + h * HD;
        for (long e = 0; e < HD; e++) o[e] = 0.f;
        for (long j = 0; j < S; j++) {
            const float w = p[j] / den;
            for (long e = 0; e < HD; e++) o[e] += w * vh[j * HD + e];
        }
    }
}

// One layer's weights for ty_decode: norms, fused q/k/v, o, fused gate/up, down.
struct Layer {
    const float* ln1;
    const float* ln2;
    Proj qkv, o, gu, down;
};

}  // namespace

extern "C" {

// The whole decode step of n_layer blocks for x [M, D] (updated in place), in one parallel region: one thread
// does the small serial parts (norms, RoPE, cache writes, SwiGLU, residuals, activation rounding), all share
// the projections and the attention. kcache/vcache: [n_layer, M, KVH, L, HD].
void ty_decode(float* x, long M, long D, long H, long KVH, long HD, long F, float eps, const Layer* layers,
               long n_layer, const float* cos, const float* sin, float* kcache, float* vcache, long L, long pos,
               int nt) {
    const long wq = layers[0].qkv.N8, wgu = layers[0].gu.N8, wd = layers[0].o.N8;
    std::vector<float> h(M * D), qkv(M * wq), att(M * H * HD), o(M * wd), gu(M * wgu), a(M * F), dn(M * wd);
    Act act;
    const long layer_stride = M * KVH * L * HD;
#pragma omp parallel num_threads(nt)
    for (long l = 0; l < n_layer; l++) {
        const Layer& ly = layers[l];
        float* kc = kcache + l * layer_stride;
        float* vc = vcache + l * layer_stride;
#pragma omp single
        rmsnorm(x, ly.ln1, eps, h.data(), M, D);
        gemm_region(h.data(), M, ly.qkv, qkv.data(), act);
#pragma omp single
        rope_and_store(qkv.data(), wq, qkv.data() + H * HD, wq, qkv.data() + (H + KVH) * HD, wq, cos, sin, kc, vc, M,
                       H, KVH, HD, L, pos);
        attend_region(qkv.data(), wq, kc, vc, M, H, KVH, HD, L, pos, att.data());
        gemm_region(att.data(), M, ly.o, o.data(), act);
#pragma omp single
        {
            add_rows(x, o.data(), wd, M, D);
            rmsnorm(x, ly.ln2, eps, h.data(), M, D);
        }
        gemm_region(h.data(), M, ly.gu, gu.data(), act);
#pragma omp single
        silu_mul(gu.data(), gu.data() + F, wgu, a.data(), M, F);
        gemm_region(a.data(), M, ly.down, dn.data(), act);
#pragma omp single
        add_rows(x, dn.data(), wd, M, D);
    }
}

}  // extern "C"
