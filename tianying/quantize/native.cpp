// Weight-only int8 / int4 matrix-vector kernels for CPU decoding (see native.py for why they exist).
//
// y[M, N] = x[M, K] · Ŵᵀ; Ŵ is never materialised for small M.
//   int8, per output row n:   Ŵ[n, k] = s[n] · (w[n, k] + o[n])        w = q − 128 (int8), o = 128 − z
//   int4, per row n, group g: Ŵ[n, k] = s[n, g] · (q[n, k] − z[n, g])  q ∈ [0, 15], s fp16, z uint8
// The weights are read in the canonical layouts `QuantLinear` keeps (its only copy of them): int8 [N, K]
// row-major; int4 [N, K/2] row-major bytes, column 2c in the low nibble of byte c and 2c+1 in the high one.
// There is no kernel-private layout to keep in sync, so nothing can read back a layout it did not write.
// Activations are rounded to int16 per block (see quantize_act), so the products and their sums over a
// block are exact integers (vpmaddwd: 16 multiply-adds per instruction) and only the block results are
// scaled in fp32. Each thread takes a contiguous range of output rows, so it reads its share of the
// weights as one sequential stream; a row is a dot product accumulated in vectors and summed across lanes
// once at its end. For int4 the activations are stored with each chunk's even columns before its odd ones
// (the order in which the low and high nibbles of consecutive bytes meet them).
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

// perm (act-order, may be null): stored column k reads input column perm[k]. chunk (int4: 16 or 32, 0 for
// int8): within each chunk of that many columns, column 2c goes to position c and 2c + 1 to chunk/2 + c.
inline long chunk_pos(long k, long chunk) {  // chunk: 0 or a power of two (no division per element)
    if (!chunk) return k;
    const long j = k & (chunk - 1);
    return (k & ~(chunk - 1)) + (j & 1) * (chunk >> 1) + (j >> 1);
}

void quantize_act(const float* x, long M, long K, long kb, Act& a, const int64_t* perm = nullptr,
                  long chunk = 0) {
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
                a.q[m * K + chunk_pos(b * kb + k, chunk)] = v;
                sum += v;
            }
            a.scale[m * nb + b] = amax / 32767.f;
            a.sum[m * nb + b] = sum;
        }
}

#ifdef TY_AVX2
inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}
#endif

// Software prefetch into L2 (a hint: past the end of the weights it is dropped): int8 rows PF_BYTES ahead,
// int4 8-row blocks PF_BLOCKS ahead (their 8 short interleaved streams escape the hardware prefetcher).
// I8_ROWS: int8 weight rows sharing each activation load for up to 2 activation rows.
#define PF_BYTES 1024
#define PF_BLOCKS 2
#define I8_ROWS 1

// ------------------------------------------------------------------------------------------ int8
// R consecutive output rows: w = their first row in the canonical int8 [N, K] (q − 128); kb % 16 == 0.
// y[m, r] = s_r · Σ_b sx_b · (Σ_{k∈b} xq·w_r + o_r · Σ_{k∈b} xq). R rows share each activation load.
template <int MB, int R>
void i8_rows(const Act& a, long K, long kb, const int8_t* w, const float* s, const float* o, float* y, long ldy) {
    const long nb = K / kb;
#ifdef TY_AVX2
    float off[MB] = {};  // Σ_b sx_b · Σ_{k∈b} xq, for the zero-point term
    __m256 tot[MB][R];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) tot[m][r] = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        __m256i acc[MB][R];
        for (int m = 0; m < MB; m++)
            for (int r = 0; r < R; r++) acc[m][r] = _mm256_setzero_si256();
        for (long k = b * kb; k < (b + 1) * kb; k += 16) {
            if ((k & 63) == 0)
                for (int r = 0; r < R; r++)
                    _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + PF_BYTES), _MM_HINT_T1);
            __m256i v[R];
            for (int r = 0; r < R; r++)
                v[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
            for (int m = 0; m < MB; m++) {
                const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * K + k));
                for (int r = 0; r < R; r++) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(v[r], x));
            }
        }
        for (int m = 0; m < MB; m++) {
            const float sx = a.scale[m * nb + b];
            for (int r = 0; r < R; r++)
                tot[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][r]), _mm256_set1_ps(sx), tot[m][r]);
            off[m] += sx * (float)a.sum[m * nb + b];
        }
    }
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) y[m * ldy + r] = s[r] * (hsum(tot[m][r]) + (o ? o[r] : 0.f) * off[m]);
#else
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            const int8_t* wr = w + r * K;
            float tot = 0.f, offr = 0.f;
            for (long b = 0; b < nb; b++) {
                int32_t acc = 0;
                for (long k = b * kb; k < (b + 1) * kb; k++) acc += (int32_t)wr[k] * a.q[m * K + k];
                const float sx = a.scale[m * nb + b];
                tot += sx * (float)acc;
                offr += sx * (float)a.sum[m * nb + b];
            }
            y[m * ldy + r] = s[r] * (tot + (o ? o[r] : 0.f) * offr);
        }
#endif
}

// ------------------------------------------------------------------------------------------ int4
// The portable path (AVX2 CPUs run i4_block8 instead).
// R consecutive output rows: w = their first row in the canonical nibbles [N, K/2]; kb % 16 == 0;
// activations in chunk order (quantize_act), chunk 32 when kb % 32 == 0, else 16. Byte c of a chunk holds
// columns 2c (low nibble) and 2c + 1 (high): zero-extended to int16 lanes, the low nibbles meet the chunk's
// even columns and the high ones its odd columns, both contiguous in the activations.
// sg, zg: row r's scale and zero of group g at [g · 8 + r] (native.operands' interleave).
// y[m, r] = Σ_b s_rg · sx_b · (Σ_{k∈b} xq·q_r − z_rg · Σ_{k∈b} xq)
template <int MB, int R>
void i4_rows(const Act& a, long K, long kb, const uint8_t* w, const uint16_t* sg, const uint8_t* zg, long G, float* y,
             long ldy) {
    const long nb = K / kb, gs = K / G, rb = K / 2;
    float off[MB][R];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) off[m][r] = 0.f;
    const long chunk = kb % 32 == 0 ? 32 : 16;
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < R; r++) {
            const uint8_t* wr = w + r * rb;
            float tot = 0.f;
            for (long b = 0; b < nb; b++) {
                const long g = b * kb / gs;
                const float s = half_to_float(sg[g * 8 + r]), z = (float)zg[g * 8 + r];
                int32_t acc = 0;
                for (long k = b * kb; k < (b + 1) * kb; k += chunk) {
                    const int16_t* xq = a.q.data() + m * K + k;
                    for (long c = 0; c < chunk / 2; c++) {
                        const uint8_t v = wr[k / 2 + c];
                        acc += (int32_t)(v & 15) * xq[c] + (int32_t)(v >> 4) * xq[chunk / 2 + c];
                    }
                }
                const float f = s * a.scale[m * nb + b];
                tot += f * (float)acc;
                off[m][r] += f * z * (float)a.sum[m * nb + b];
            }
            y[m * ldy + r] = tot - off[m][r];
        }
}

#ifdef TY_AVX2
// 8 consecutive output rows at once (AVX2; int4 layers have N % 8 == 0): per activation row, 8 integer
// accumulators (one per weight row) are reduced across lanes once per block into one vector of 8 row sums,
// so the per-group scaling is one vector operation for 8 rows (sb, zb: this block's [G][8] operands).
// Activation rows run one after the other over the same 8 weight rows (from L1 after the first).
template <int MB>
void i4_block8(const Act& a, long K, long kb, const uint8_t* w, const uint16_t* sb, const uint8_t* zb, long G,
               float* y, long ldy) {
    const long nb = K / kb, gs = K / G, rb = K / 2;
    const __m256i low = _mm256_set1_epi16(0x0f);
    const __m128i low128 = _mm_set1_epi16(0x0f);
    for (int m = 0; m < MB; m++) {
        const int16_t* xm = a.q.data() + m * K;
        __m256 tot = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
        __m256i vz = _mm256_setzero_si256();
        for (long b = 0; b < nb; b++) {
            const long g = b * kb / gs;
            if (b * kb % gs == 0) {
                vs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
                vz = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zb + g * 8)));
            }
            __m256i acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_si256();
            if (kb % 32 == 0) {
                for (long k = b * kb; k < (b + 1) * kb; k += 32) {
                    if (m == 0 && (k & 127) == 0)  // the same line of the block PF_BLOCKS ahead
                        for (int r = 0; r < 8; r++)
                            _mm_prefetch(reinterpret_cast<const char*>(w + (r + 8 * PF_BLOCKS) * rb + k / 2),
                                         _MM_HINT_T1);
                    const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
                    const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k + 16));
                    for (int r = 0; r < 8; r++) {
                        const __m256i v = _mm256_cvtepu8_epi16(
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rb + k / 2)));
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_and_si256(v, low), xe));
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_srli_epi16(v, 4), xo));
                    }
                }
            } else {
                for (long k = b * kb; k < (b + 1) * kb; k += 16) {
                    const __m128i xe = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xm + k));
                    const __m128i xo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xm + k + 8));
                    for (int r = 0; r < 8; r++) {
                        const __m128i v =
                            _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + r * rb + k / 2)));
                        const __m128i d = _mm_add_epi32(_mm_madd_epi16(_mm_and_si128(v, low128), xe),
                                                        _mm_madd_epi16(_mm_srli_epi16(v, 4), xo));
                        acc[r] = _mm256_add_epi32(acc[r], _mm256_inserti128_si256(_mm256_setzero_si256(), d, 0));
                    }
                }
            }
            // lane sums of the 8 accumulators → [row 0 .. row 7]
            const __m256i t0 = _mm256_hadd_epi32(acc[0], acc[1]), t1 = _mm256_hadd_epi32(acc[2], acc[3]);
            const __m256i t2 = _mm256_hadd_epi32(acc[4], acc[5]), t3 = _mm256_hadd_epi32(acc[6], acc[7]);
            const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
            const __m256i rows = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20),
                                                  _mm256_permute2x128_si256(u0, u1, 0x31));
            // s·sx·(Σ xq·q − z·Σ xq), exact in int32 up to the scaling
            const __m256i d = _mm256_sub_epi32(rows, _mm256_mullo_epi32(vz, _mm256_set1_epi32(a.sum[m * nb + b])));
            tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(vs, _mm256_set1_ps(a.scale[m * nb + b])), tot);
        }
        _mm256_storeu_ps(y + m * ldy, tot);
    }
}
#endif

// A projection's operands (see the layouts above); o: int8 offsets (or null), z: int4 zeros, perm: act-order
// column order (or null).
// w: canonical weights of N rows (int8 [N, K] or nibbles [N, K/2]); outputs have row stride N8 (N rounded up
// to 8; columns N..N8 are left unwritten).
struct Proj {
    const void* w;
    const void* s;
    const void* o;
    const uint8_t* z;
    long N, N8, K, kb, G;
    int int8;
    const int64_t* perm;
};

// Called by every thread of an enclosing parallel region (orphaned worksharing): output rows split
// statically between the threads (contiguous ranges: one sequential weight stream each); the implicit
// barrier at the end of `omp for` ends the call.
template <int MB, int R>
void row_group(const Act& a, const Proj& p, long n, float* y) {
    if (p.int8)
        i8_rows<MB, R>(a, p.K, p.kb, static_cast<const int8_t*>(p.w) + n * p.K, static_cast<const float*>(p.s) + n,
                       p.o ? static_cast<const float*>(p.o) + n : nullptr, y + n, p.N8);
    else  // scales/zeros interleaved [N8/8][G][8]: row n's at (n / 8)·G·8 + n % 8
        i4_rows<MB, R>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + n * (p.K / 2),
                       static_cast<const uint16_t*>(p.s) + (n / 8) * p.G * 8 + n % 8, p.z + (n / 8) * p.G * 8 + n % 8,
                       p.G, y + n, p.N8);
}

// Called by every thread of an enclosing parallel region (orphaned worksharing): groups of R = 8 / MB
// output rows (sharing the activation loads) split statically between the threads, so each reads its share
// of the weights as one sequential stream; the implicit barrier at the end of `omp for` ends the call.
template <int MB, int R>
void gemm_rows_r(const Act& a, const Proj& p, float* y) {
    const long full = p.N / R;
#pragma omp for schedule(static)
    for (long i = 0; i <= full; i++) {
        if (i < full) {
            row_group<MB, R>(a, p, i * R, y);
        } else {
            for (long n = full * R; n < p.N; n++) row_group<MB, 1>(a, p, n, y);
        }
    }
}

template <int MB>
void gemm_rows(const Act& a, const Proj& p, float* y) {
    if (p.int8) {
        gemm_rows_r<MB, (MB >= 4 ? 8 / MB : I8_ROWS)>(a, p, y);
        return;
    }
#ifdef TY_AVX2
#pragma omp for schedule(static)
    for (long b = 0; b < p.N / 8; b++)  // int4: N % 8 == 0 (QuantSpec.check)
        i4_block8<MB>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + b * 8 * (p.K / 2),
                      static_cast<const uint16_t*>(p.s) + b * p.G * 8, p.z + b * p.G * 8, p.G, y + b * 8, p.N8);
#else
    gemm_rows_r<MB, 1>(a, p, y);
#endif
}

// y [M, N8] = x [M, K] · Ŵᵀ inside a parallel region; `a` is shared scratch (one thread rounds the activations).
void gemm_region(const float* x, long M, const Proj& p, float* y, Act& a) {
    for (long m0 = 0; m0 < M;) {
        const long left = M - m0;
        const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
#pragma omp single
        quantize_act(x + m0 * p.K, mb, p.K, p.kb, a, p.perm, p.int8 ? 0 : (p.kb % 32 == 0 ? 32 : 16));
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

// x [M, K] fp32 contiguous; activation block kb (a multiple of 16 dividing K, ≤ 256); y [M, N8] fp32, N8 = N
// rounded up to 8. int8: w canonical int8 [N, K], s/o fp32 [N8] (o = 128 − z, or null when symmetric).
void ty_gemm_i8(const float* x, long M, long K, long kb, const int8_t* w, long N, const float* s, const float* o,
                float* y, long N8, int nt) {
    gemm(x, M, Proj{w, s, o, nullptr, N, N8, K, kb, 1, 1, nullptr}, y, nt);
}

// int4: w canonical nibbles [N, K/2], s fp16 bits / z uint8 [N8/8][G][8]; kb a multiple of 16 dividing the
// group size K / G.
void ty_gemm_i4(const float* x, long M, long K, long kb, const uint8_t* w, long N, const uint16_t* s,
                const uint8_t* z, long G, float* y, long N8, int nt) {
    gemm(x, M, Proj{w, s, nullptr, z, N, N8, K, kb, G, 0, nullptr}, y, nt);
}

// Rows [n0, n1) of Ŵ into out [n1 − n0, K] fp32 from the canonical tensors (w as above, scales fp16 bits
// [G, N], zeros int16 [G, N]) with the reference's arithmetic: (q − z) · s, so bit-equal to it.
void ty_dequant_i8(const int8_t* w, const uint16_t* s, const int16_t* z, long K, long n0, long n1, float* out,
                   int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long n = n0; n < n1; n++) {
        const float zn = (float)z[n], sn = half_to_float(s[n]);
        float* o = out + (n - n0) * K;
        const int8_t* wn = w + n * K;
        for (long k = 0; k < K; k++) o[k] = ((float)wn[k] + 128.f - zn) * sn;
    }
}

void ty_dequant_i4(const uint8_t* w, const uint16_t* s, const int16_t* z, long N, long G, long K, long n0, long n1,
                   float* out, int nt) {
    const long gs = K / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long n = n0; n < n1; n++) {
        float* o = out + (n - n0) * K;
        const uint8_t* wn = w + n * (K / 2);
        for (long k = 0; k < K; k++) {
            const long g = k / gs;
            const float sg = half_to_float(s[g * N + n]), zg = (float)z[g * N + n];
            const uint8_t v = wn[k / 2];
            o[k] = ((float)(k % 2 ? v >> 4 : v & 15) - zg) * sg;
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

// Rotary embedding (rotate-half layout) of q [M, H, HD] and k [M, KVH, HD] in place with each row's cos and
// signed sin [M, HD] (first half negated), and k, v written to row m's cache [KVH, L, HD] at pos[m].
void rope_and_store(float* q, long ldq, float* k, long ldk, const float* v, long ldv, const float* cos,
                    const float* sin, float* kc, float* vc, long M, long H, long KVH, long HD, long L,
                    const long* pos) {
    const long half = HD / 2;
    for (long m = 0; m < M; m++) {
        const float* cm = cos + m * HD;
        const float* sm = sin + m * HD;
        for (long h = 0; h < H + KVH; h++) {
            float* t = h < H ? q + m * ldq + h * HD : k + m * ldk + (h - H) * HD;
            float tmp[1024];
            for (long d = 0; d < HD; d++) tmp[d] = t[d];
            for (long d = 0; d < HD; d++) t[d] = tmp[d] * cm[d] + tmp[(d + half) % HD] * sm[d];
        }
        for (long h = 0; h < KVH; h++) {
            std::memcpy(kc + ((m * KVH + h) * L + pos[m]) * HD, k + m * ldk + h * HD, HD * sizeof(float));
            std::memcpy(vc + ((m * KVH + h) * L + pos[m]) * HD, v + m * ldv + h * HD, HD * sizeof(float));
        }
    }
}

// Each query head of row m attends to cache positions 0..pos[m] of its KV head (GQA: consecutive query heads
// share one); out [M, H·HD]. Worksharing over (row, head) inside a parallel region.
void attend_region(const float* q, long ldq, const float* kc, const float* vc, long M, long H, long KVH, long HD,
                   long L, const long* pos, float* out) {
    const long rep = H / KVH;
    const float scale = 1.f / std::sqrt((float)HD);
    std::vector<float> p(L);
#pragma omp for schedule(static)
    for (long mh = 0; mh < M * H; mh++) {
        const long m = mh / H, h = mh % H, g = h / rep, S = pos[m] + 1;
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
// the projections and the attention. kcache/vcache point at row 0 of the step's rows in a cache
// [n_layer, R, KVH, L, HD] (R ≥ M rows); row m writes and attends at its own length pos[m], with its own
// rotary cos/sin [M, HD].
void ty_decode(float* x, long M, long D, long H, long KVH, long HD, long F, float eps, const Layer* layers,
               long n_layer, const float* cos, const float* sin, float* kcache, float* vcache, long R, long L,
               const long* pos, int nt) {
    const long wq = layers[0].qkv.N8, wgu = layers[0].gu.N8, wd = layers[0].o.N8;
    std::vector<float> h(M * D), qkv(M * wq), att(M * H * HD), o(M * wd), gu(M * wgu), a(M * F), dn(M * wd);
    Act act;
    const long layer_stride = R * KVH * L * HD;
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
