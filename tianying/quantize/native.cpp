// Weight-only int8 / int4 matrix-vector kernels for CPU decoding (see native.py for why they exist).
//
// y[M, N] = x[M, K] · Ŵᵀ with fp32 activations and accumulation; Ŵ is never materialised for small M.
//   int8, per output row n:   Ŵ[n, k] = s[n] · (w[n, k] + o[n])        w = q − 128 (int8), o = 128 − z
//   int4, per row n, group g: Ŵ[n, k] = s[n, g] · (q[n, k] − z[n, g])  q ∈ [0, 15], s fp16, z uint8
//
// Layouts interleave 8 output rows so that a decode step reads each thread's share of the weights as one
// sequential stream and accumulates 8 outputs in one vector (no horizontal sums):
//   int8 "x8":  w[N/8][K][8]      byte (b, k, r) = row 8b + r, column k
//   int4 "x8":  w[N/8][K/2][8]    byte (b, j, r) = row 8b + r: column 2j in the low nibble, 2j + 1 high
//   int4 scales s[N/8][G][8] (fp16 bits) and zeros z[N/8][G][8] (uint8), group size K / G (even).
// Large M is served by the dequantize functions and a BLAS GEMM (the caller chunks the rows).
// Compiled by native.py with -O3 -fopenmp (and -mavx2 -mfma -mf16c where the CPU has them); the scalar
// path is the same arithmetic for other CPUs. OpenMP resolves to the runtime torch already loaded.
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TY_AVX2 1
#endif

namespace {

constexpr int MAXM = 16;  // activation rows per pass over the weights

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

// ------------------------------------------------------------------------------------------ int8
template <int MB>
void i8_block(const float* x, long K, const int8_t* wb, const float* s, const float* o, const float* xs, float* y,
              long N) {
    // wb: this block's [K][8] bytes; s, o: this block's 8 rows; y: column offset of the block
#ifdef TY_AVX2
    __m256 a0[MB], a1[MB];
    for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 2 <= K; k += 2) {
        __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * 8)));
        __m256i u = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * 8 + 8)));
        __m256 w0 = _mm256_cvtepi32_ps(v), w1 = _mm256_cvtepi32_ps(u);
        for (int m = 0; m < MB; m++) {
            a0[m] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + m * K + k), a0[m]);
            a1[m] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(x + m * K + k + 1), a1[m]);
        }
    }
    for (; k < K; k++) {
        __m256 w0 = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * 8))));
        for (int m = 0; m < MB; m++) a0[m] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + m * K + k), a0[m]);
    }
    const __m256 vs = _mm256_loadu_ps(s);
    const __m256 vo = o ? _mm256_loadu_ps(o) : _mm256_setzero_ps();
    for (int m = 0; m < MB; m++) {
        __m256 d = _mm256_fmadd_ps(vo, _mm256_set1_ps(xs[m]), _mm256_add_ps(a0[m], a1[m]));
        _mm256_storeu_ps(y + m * N, _mm256_mul_ps(vs, d));
    }
#else
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < 8; r++) {
            float d = 0.f;
            for (long k = 0; k < K; k++) d += (float)wb[k * 8 + r] * x[m * K + k];
            y[m * N + r] = s[r] * (d + (o ? o[r] * xs[m] : 0.f));
        }
#endif
}

template <int MB>
void i8_span(const float* x, long K, const int8_t* w, const float* s, const float* o, const float* xs, float* y,
             long N, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long b = 0; b < N / 8; b++)
        i8_block<MB>(x, K, w + b * K * 8, s + b * 8, o ? o + b * 8 : nullptr, xs, y + b * 8, N);
}

// ------------------------------------------------------------------------------------------ int4
template <int MB>
void i4_block(const float* x, long K, const uint8_t* wb, const uint16_t* sb, const uint8_t* zb, long G,
              const float* xs, float* y, long N) {
    // wb: [K/2][8] bytes; sb, zb: [G][8]; xs: [MB][G] group sums of x
    const long gs = K / G;
#ifdef TY_AVX2
    const __m256i lowmask = _mm256_set1_epi32(0x0f);
    __m256 tot[MB];
    for (int m = 0; m < MB; m++) tot[m] = _mm256_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m256 a0[MB], a1[MB];
        for (int m = 0; m < MB; m++) a0[m] = a1[m] = _mm256_setzero_ps();
        for (long k = g * gs; k < (g + 1) * gs; k += 2) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * 4)));
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(v, lowmask));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
            for (int m = 0; m < MB; m++) {
                a0[m] = _mm256_fmadd_ps(w0, _mm256_broadcast_ss(x + m * K + k), a0[m]);
                a1[m] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(x + m * K + k + 1), a1[m]);
            }
        }
        const __m256 vs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
        const __m256 vz = _mm256_cvtepi32_ps(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zb + g * 8))));
        for (int m = 0; m < MB; m++) {
            // s·(Σ x q − z·Σ x) over the group
            __m256 d = _mm256_fnmadd_ps(vz, _mm256_set1_ps(xs[m * G + g]), _mm256_add_ps(a0[m], a1[m]));
            tot[m] = _mm256_fmadd_ps(vs, d, tot[m]);
        }
    }
    for (int m = 0; m < MB; m++) _mm256_storeu_ps(y + m * N, tot[m]);
#else
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < 8; r++) {
            float tot = 0.f;
            for (long g = 0; g < G; g++) {
                float d = 0.f;
                for (long k = g * gs; k < (g + 1) * gs; k += 2) {
                    const uint8_t b = wb[k * 4 + r];
                    d += (float)(b & 15) * x[m * K + k] + (float)(b >> 4) * x[m * K + k + 1];
                }
                d -= (float)zb[g * 8 + r] * xs[m * G + g];
                tot += half_to_float(sb[g * 8 + r]) * d;
            }
            y[m * N + r] = tot;
        }
#endif
}

template <int MB>
void i4_span(const float* x, long K, const uint8_t* w, const uint16_t* sc, const uint8_t* z, long G,
             const float* xs, float* y, long N, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long b = 0; b < N / 8; b++)
        i4_block<MB>(x, K, w + b * K * 4, sc + b * G * 8, z + b * G * 8, G, xs, y + b * 8, N);
}

}  // namespace

extern "C" {

int ty_simd() {
#ifdef TY_AVX2
    return 2;
#else
    return 0;
#endif
}

// x [M, K] fp32 contiguous, w int8 x8 layout, s/o fp32 [N] (o may be null: symmetric), y [M, N] fp32;
// N % 8 == 0 (the caller pads).
void ty_gemm_i8(const float* x, long M, long K, const int8_t* w, const float* s, const float* o, float* y, long N,
                int nt) {
    float xs[MAXM];
    for (long m0 = 0; m0 < M; m0 += MAXM) {
        const long mc = M - m0 < MAXM ? M - m0 : MAXM;
        for (long m = 0; m < mc; m++) {
            float t = 0.f;
            if (o)
                for (long k = 0; k < K; k++) t += x[(m0 + m) * K + k];
            xs[m] = t;
        }
        for (long m = 0; m < mc;) {
            const float* xm = x + (m0 + m) * K;
            float* ym = y + (m0 + m) * N;
            const long left = mc - m;
            if (left >= 8) {
                i8_span<8>(xm, K, w, s, o, xs + m, ym, N, nt);
                m += 8;
            } else if (left >= 4) {
                i8_span<4>(xm, K, w, s, o, xs + m, ym, N, nt);
                m += 4;
            } else if (left >= 2) {
                i8_span<2>(xm, K, w, s, o, xs + m, ym, N, nt);
                m += 2;
            } else {
                i8_span<1>(xm, K, w, s, o, xs + m, ym, N, nt);
                m += 1;
            }
        }
    }
}

// x [M, K] fp32, w uint8 int4 x8 layout, sc fp16 bits / z uint8 [N/8][G][8], xs scratch fp32 [16 * G],
// y [M, N]; N % 8 == 0, K % G == 0, (K / G) even.
void ty_gemm_i4(const float* x, long M, long K, const uint8_t* w, const uint16_t* sc, const uint8_t* z, long G,
                float* xs, float* y, long N, int nt) {
    const long gs = K / G;
    for (long m0 = 0; m0 < M; m0 += MAXM) {
        const long mc = M - m0 < MAXM ? M - m0 : MAXM;
        for (long m = 0; m < mc; m++)
            for (long g = 0; g < G; g++) {
                float t = 0.f;
                for (long k = g * gs; k < (g + 1) * gs; k++) t += x[(m0 + m) * K + k];
                xs[m * G + g] = t;
            }
        for (long m = 0; m < mc;) {
            const float* xm = x + (m0 + m) * K;
            float* ym = y + (m0 + m) * N;
            const long left = mc - m;
            if (left >= 8) {
                i4_span<8>(xm, K, w, sc, z, G, xs + m * G, ym, N, nt);
                m += 8;
            } else if (left >= 4) {
                i4_span<4>(xm, K, w, sc, z, G, xs + m * G, ym, N, nt);
                m += 4;
            } else if (left >= 2) {
                i4_span<2>(xm, K, w, sc, z, G, xs + m * G, ym, N, nt);
                m += 2;
            } else {
                i4_span<1>(xm, K, w, sc, z, G, xs + m * G, ym, N, nt);
                m += 1;
            }
        }
    }
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
            for (long k = 0; k < K; k++) o[k] = ((float)w[(b * K + k) * 8 + r] + 128.f - zn) * sn;
        }
}

void ty_dequant_i4(const uint8_t* w, const uint16_t* sc, const uint8_t* z, long G, long K, long n0, long n1,
                   float* out, int nt) {
    const long gs = K / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long b = n0 / 8; b < n1 / 8; b++)
        for (int r = 0; r < 8; r++) {
            float* o = out + (b * 8 + r - n0) * K;
            for (long g = 0; g < G; g++) {
                const float sg = half_to_float(sc[(b * G + g) * 8 + r]), zg = (float)z[(b * G + g) * 8 + r];
                for (long k = g * gs; k < (g + 1) * gs; k += 2) {
                    const uint8_t v = w[(b * K / 2 + k / 2) * 8 + r];
                    o[k] = ((float)(v & 15) - zg) * sg;
                    o[k + 1] = ((float)(v >> 4) - zg) * sg;
                }
            }
        }
}

}  // extern "C"
