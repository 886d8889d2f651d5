// CPU operations the model calls for decoding (see tianying/ops/__init__.py for why they exist): weight-only
// int8 / int4 and dense fp32 / bf16 / fp16 matrix-vector products (OP_LINEAR, optionally fused with the
// RMSNorm or SwiGLU in front of them and the residual add behind), a block's MLP (OP_MLP), and attention of
// one new token per row over its KV-cache row (OP_ATTEND: RoPE, cache write, softmax(qKᵀ)V). `ty_run` runs a
// list of them in one parallel region: one op called now, or a recorded decode step replayed.
//
// Quantized products:
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
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TY_AVX2 1
// acc + Σ pairs of int16 products, exact in int32: one VNNI instruction where the CPU has it (the same bits)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define TY_DPWSSD(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define TY_DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define TY_DPWSSD(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
// AVX-512 (BW): int4 blocks of 64 columns per instruction (the build adds -mavx512f -mavx512bw where torch
// dispatches AVX512 code and the CPU has them)
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TY_AVX512 1
#if defined(__AVX512VNNI__)
#define TY_DPWSSD512(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define TY_DPWSSD512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif
#endif
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
    std::vector<float> scale8;  // MB = 8: scale and sum transposed, [K / kb][8] (one vector per block)
    std::vector<int32_t> sum8;
};

// perm (act-order, may be null): stored column k reads input column perm[k]. chunk (int4: 16, 32 or 64, 0 for
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
    if (M == 8) {
        a.scale8.resize(nb * 8);
        a.sum8.resize(nb * 8);
        for (long m = 0; m < 8; m++)
            for (long b = 0; b < nb; b++) a.scale8[b * 8 + m] = a.scale[m * nb + b], a.sum8[b * 8 + m] = a.sum[m * nb + b];
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

// Software prefetch into L2 (a hint: past the end of the weights it is dropped) of int4 8-row blocks PF_BLOCKS
// ahead (their 8 short interleaved streams escape the hardware prefetcher). int8 and dense rows are read as one
// front-to-back stream per thread, which the hardware prefetcher follows better without hints (measured).
// I8_ROWS: int8 weight rows sharing each activation load for up to 2 activation rows.
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
    // U independent accumulators per (row, activation row): with few of them the multiply-add chain's latency,
    // not memory, would bound the speed (one chain moves 16 bytes per ~5 cycles)
    constexpr int U = MB * R >= 4 ? 1 : 4 / (MB * R);
    for (long b = 0; b < nb; b++) {
        __m256i acc[U][MB][R];
        for (int u = 0; u < U; u++)
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < R; r++) acc[u][m][r] = _mm256_setzero_si256();
        const long k1 = (b + 1) * kb;
        for (long k0 = b * kb; k0 < k1; k0 += 16 * U) {
            for (int u = 0; u < U; u++) {
                const long k = k0 + 16 * u;
                if (U > 1 && k >= k1) break;

                __m256i v[R];
                for (int r = 0; r < R; r++)
                    v[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
                for (int m = 0; m < MB; m++) {
                    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + m * K + k));
                    for (int r = 0; r < R; r++) acc[u][m][r] = TY_DPWSSD(acc[u][m][r], v[r], x);
                }
            }
        }
        for (int u = 1; u < U; u++)  // exact: integer sums in any order
            for (int m = 0; m < MB; m++)
                for (int r = 0; r < R; r++) acc[0][m][r] = _mm256_add_epi32(acc[0][m][r], acc[u][m][r]);
        for (int m = 0; m < MB; m++) {
            const float sx = a.scale[m * nb + b];
            for (int r = 0; r < R; r++)
                tot[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[0][m][r]), _mm256_set1_ps(sx), tot[m][r]);
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
// [Σ lanes of a[0], …, Σ lanes of a[7]] (8 int32 vectors)
inline __m256i row_sums8(const __m256i* a) {
    const __m256i t0 = _mm256_hadd_epi32(a[0], a[1]), t1 = _mm256_hadd_epi32(a[2], a[3]);
    const __m256i t2 = _mm256_hadd_epi32(a[4], a[5]), t3 = _mm256_hadd_epi32(a[6], a[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

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
                        acc[r] = TY_DPWSSD(acc[r], _mm256_and_si256(v, low), xe);
                        acc[r] = TY_DPWSSD(acc[r], _mm256_srli_epi16(v, 4), xo);
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
            // s·sx·(Σ xq·q − z·Σ xq) with the 8 rows' lane sums, exact in int32 up to the scaling
            const __m256i d =
                _mm256_sub_epi32(row_sums8(acc), _mm256_mullo_epi32(vz, _mm256_set1_epi32(a.sum[m * nb + b])));
            tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(vs, _mm256_set1_ps(a.scale[m * nb + b])), tot);
        }
        _mm256_storeu_ps(y + m * ldy, tot);
    }
}

// i4_block8 for 8 activation rows (kb % 32 == 0): weight rows one at a time, each 32 columns unpacked once and
// multiplied with all 8 activation rows (8 accumulators, one per activation row), so the unpacking is shared
// instead of repeated per row. Per block, row_sums8 gives one vector of the 8 activation rows' sums, scaled by
// the row's s and z and the rows' own sx (Act::scale8 / sum8).
void i4_block8_m8(const Act& a, long K, long kb, const uint8_t* w, const uint16_t* sb, const uint8_t* zb, long G,
                  float* y, long ldy) {
    const long nb = K / kb, gs = K / G, rb = K / 2;
    const __m256i low = _mm256_set1_epi16(0x0f);
    const int16_t* xq = a.q.data();
    for (int r = 0; r < 8; r++) {
        const uint8_t* wr = w + r * rb;
        __m256 tot = _mm256_setzero_ps();  // lane m: activation row m
        for (long b = 0; b < nb; b++) {
            const long g = b * kb / gs;
            __m256i acc[8];
            for (int m = 0; m < 8; m++) acc[m] = _mm256_setzero_si256();
            for (long k = b * kb; k < (b + 1) * kb; k += 32) {
                const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + k / 2)));
                const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_srli_epi16(v, 4);
                for (int m = 0; m < 8; m++) {
                    const int16_t* xm = xq + m * K + k;
                    acc[m] = TY_DPWSSD(acc[m], lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm)));
                    acc[m] = TY_DPWSSD(acc[m], hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + 16)));
                }
            }
            const __m256i sums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.sum8.data() + b * 8));
            const __m256i d = _mm256_sub_epi32(row_sums8(acc), _mm256_mullo_epi32(_mm256_set1_epi32(zb[g * 8 + r]), sums));
            const __m256 f = _mm256_mul_ps(_mm256_set1_ps(half_to_float(sb[g * 8 + r])), _mm256_loadu_ps(a.scale8.data() + b * 8));
            tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), f, tot);
        }
        alignas(32) float t[8];
        _mm256_store_ps(t, tot);
        for (int m = 0; m < 8; m++) y[m * ldy + r] = t[m];
    }
}

#ifdef TY_AVX512
// i4_block8 with 64 columns per step (kb % 64 == 0, activations in chunk-64 order): a row's 32 bytes widen to
// 32 int16 lanes whose low nibbles meet the chunk's 32 even columns and high nibbles its 32 odd ones.
template <int MB>
void i4_block8_512(const Act& a, long K, long kb, const uint8_t* w, const uint16_t* sb, const uint8_t* zb, long G,
                   float* y, long ldy) {
    const long nb = K / kb, gs = K / G, rb = K / 2;
    const __m512i low = _mm512_set1_epi16(0x0f);
    for (int m = 0; m < MB; m++) {
        const int16_t* xm = a.q.data() + m * K;
        __m256 tot = _mm256_setzero_ps(), vs = _mm256_setzero_ps();
        __m256i vz = _mm256_setzero_si256();
        for (long b = 0; b < nb; b++) {
            if (b * kb % gs == 0) {
                const long g = b * kb / gs;
                vs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + g * 8)));
                vz = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zb + g * 8)));
            }
            __m512i acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm512_setzero_si512();
            for (long k = b * kb; k < (b + 1) * kb; k += 64) {
                if (m == 0 && (k & 127) == 0)  // the same line of the block PF_BLOCKS ahead
                    for (int r = 0; r < 8; r++)
                        _mm_prefetch(reinterpret_cast<const char*>(w + (r + 8 * PF_BLOCKS) * rb + k / 2), _MM_HINT_T1);
                const __m512i xe = _mm512_loadu_si512(xm + k);
                const __m512i xo = _mm512_loadu_si512(xm + k + 32);
                for (int r = 0; r < 8; r++) {
                    const __m512i v =
                        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rb + k / 2)));
                    acc[r] = TY_DPWSSD512(acc[r], _mm512_and_si512(v, low), xe);
                    acc[r] = TY_DPWSSD512(acc[r], _mm512_srli_epi16(v, 4), xo);
                }
            }
            __m256i half[8];
            for (int r = 0; r < 8; r++)
                half[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
            const __m256i d =
                _mm256_sub_epi32(row_sums8(half), _mm256_mullo_epi32(vz, _mm256_set1_epi32(a.sum[m * nb + b])));
            tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(vs, _mm256_set1_ps(a.scale[m * nb + b])), tot);
        }
        _mm256_storeu_ps(y + m * ldy, tot);
    }
}
#endif
#endif

// A weight operand (see the layouts above). kind: KF32/KBF16/KF16 (dense row-major [N, K], read in place) or
// KI8/KI4 (canonical quantized tensors; s, o/z their kernel operands, perm an act-order column order or null).
// Outputs have row stride ldy; quantized ones write N8 (N rounded up to 8) columns, dense ones N.
enum { KF32 = 0, KBF16 = 1, KF16 = 2, KI8 = 3, KI4 = 4 };
struct Proj {
    const void* w;
    const void* s;
    const void* o;
    const uint8_t* z;
    long N, N8, K, kb, G;
    int kind;
    const int64_t* perm;
};

// Called by every thread of an enclosing parallel region (orphaned worksharing): output rows split
// statically between the threads (contiguous ranges: one sequential weight stream each); the implicit
// barrier at the end of `omp for` ends the call.
template <int MB, int R>
void row_group(const Act& a, const Proj& p, long n, float* y, long ldy) {
    if (p.kind == KI8)
        i8_rows<MB, R>(a, p.K, p.kb, static_cast<const int8_t*>(p.w) + n * p.K, static_cast<const float*>(p.s) + n,
                       p.o ? static_cast<const float*>(p.o) + n : nullptr, y + n, ldy);
    else  // scales/zeros interleaved [N8/8][G][8]: row n's at (n / 8)·G·8 + n % 8
        i4_rows<MB, R>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + n * (p.K / 2),
                       static_cast<const uint16_t*>(p.s) + (n / 8) * p.G * 8 + n % 8, p.z + (n / 8) * p.G * 8 + n % 8,
                       p.G, y + n, ldy);
}

// Groups of R = 8 / MB output rows (sharing the activation loads) split statically between the threads.
template <int MB, int R>
void gemm_rows_r(const Act& a, const Proj& p, float* y, long ldy) {
    const long full = p.N / R;
#pragma omp for schedule(static)
    for (long i = 0; i <= full; i++) {
        if (i < full) {
            row_group<MB, R>(a, p, i * R, y, ldy);
        } else {
            for (long n = full * R; n < p.N; n++) row_group<MB, 1>(a, p, n, y, ldy);
        }
    }
}

template <int MB>
void gemm_rows(const Act& a, const Proj& p, float* y, long ldy) {
    if (p.kind == KI8) {
        gemm_rows_r<MB, (MB >= 4 ? 8 / MB : I8_ROWS)>(a, p, y, ldy);
        return;
    }
#ifdef TY_AVX512
    if (p.kb % 64 == 0) {
#pragma omp for schedule(static)
        for (long b = 0; b < p.N / 8; b++)
            i4_block8_512<MB>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + b * 8 * (p.K / 2),
                              static_cast<const uint16_t*>(p.s) + b * p.G * 8, p.z + b * p.G * 8, p.G, y + b * 8, ldy);
        return;
    }
#endif
#ifdef TY_AVX2
    if (MB == 8 && p.kb % 32 == 0) {
#pragma omp for schedule(static)
        for (long b = 0; b < p.N / 8; b++)
            i4_block8_m8(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + b * 8 * (p.K / 2),
                         static_cast<const uint16_t*>(p.s) + b * p.G * 8, p.z + b * p.G * 8, p.G, y + b * 8, ldy);
        return;
    }
#pragma omp for schedule(static)
    for (long b = 0; b < p.N / 8; b++)  // int4: N % 8 == 0 (QuantSpec.check)
        i4_block8<MB>(a, p.K, p.kb, static_cast<const uint8_t*>(p.w) + b * 8 * (p.K / 2),
                      static_cast<const uint16_t*>(p.s) + b * p.G * 8, p.z + b * p.G * 8, p.G, y + b * 8, ldy);
#else
    gemm_rows_r<MB, 1>(a, p, y, ldy);
#endif
}

// The int4 activation order the kernel for this block size reads (see quantize_act).
inline long i4_chunk(long kb) {
#ifdef TY_AVX512
    if (kb % 64 == 0) return 64;
#endif
    return kb % 32 == 0 ? 32 : 16;
}

// y [M, ldy] = x [M, K] (contiguous) · Ŵᵀ inside a parallel region; `a` is shared scratch (one thread rounds
// the activations of up to 8 rows, then every thread streams its share of the weights once for them).
// `rounded`: `a` already holds these ≤ 8 rows rounded for this kb, perm and kind (the previous weight of a call).
void gemm_region(const float* x, long M, const Proj& p, float* y, long ldy, Act& a, bool rounded = false) {
    for (long m0 = 0; m0 < M;) {
        const long left = M - m0;
        const int mb = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (!rounded || mb != M) {  // (several blocks: `a` holds only the last one)
#pragma omp single
            quantize_act(x + m0 * p.K, mb, p.K, p.kb, a, p.perm, p.kind == KI8 ? 0 : i4_chunk(p.kb));
        }
        float* ym = y + m0 * ldy;
        if (mb == 8) gemm_rows<8>(a, p, ym, ldy);
        else if (mb == 4) gemm_rows<4>(a, p, ym, ldy);
        else if (mb == 2) gemm_rows<2>(a, p, ym, ldy);
        else gemm_rows<1>(a, p, ym, ldy);
        m0 += mb;
    }
}

void gemm(const float* x, long M, const Proj& p, float* y, int nt) {
    Act a;
#pragma omp parallel num_threads(nt)
    gemm_region(x, M, p, y, p.N8, a);
}

// ------------------------------------------------------------------------------------------ dense
// Dense weights (fp32, or bf16 / fp16 widened to fp32 exactly) times fp32 activations, accumulated in fp32.
// A bf16 value is the top half of an fp32 one, so widening is a shift; fp16 uses the F16C conversion.
inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

template <int KIND>
inline float wscalar(const void* w, long i) {
    if (KIND == KF32) return static_cast<const float*>(w)[i];
    if (KIND == KBF16) return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
    return half_to_float(static_cast<const uint16_t*>(w)[i]);
}

#ifdef TY_AVX2
template <int KIND>
inline __m256 wload(const void* w, long i) {
    if (KIND == KF32) return _mm256_loadu_ps(static_cast<const float*>(w) + i);
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    if (KIND == KBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}
#endif

#ifdef TY_AVX2
// The dense GEMV's vector operations at one width: 8 lanes (AVX2, 16 registers) or 16 (AVX-512, 32).
struct Vec8 {
    using T = __m256;
    static constexpr int W = 8, REGS = 16;
    static T zero() { return _mm256_setzero_ps(); }
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    template <int KIND>
    static T weights(const void* w, long i) { return wload<KIND>(w, i); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static float sum(T a) { return hsum(a); }
};
#endif
#ifdef TY_AVX512
struct Vec16 {
    using T = __m512;
    static constexpr int W = 16, REGS = 32;
    static T zero() { return _mm512_setzero_ps(); }
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    template <int KIND>
    static T weights(const void* w, long i) {
        if (KIND == KF32) return _mm512_loadu_ps(static_cast<const float*>(w) + i);
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
        if (KIND == KBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        return _mm512_cvtph_ps(h);
    }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static T add(T a, T b) { return _mm512_add_ps(a, b); }
    static float sum(T a) { return _mm512_reduce_add_ps(a); }
};
#endif

// tot[m] = Σ_k x[m, k] · w[n, k] over the columns k < K that whole vectors cover (k ends after them): one
// weight row streams through once, each loaded weight vector meets all MB activation rows (from L1), and U
// independent accumulators per activation row keep the FMA latency from bounding the speed. A thread's rows are
// one contiguous stretch of memory read front to back, the pattern hardware prefetchers follow best (rows side
// by side would be several short streams that each end after one row).
template <class V, int KIND, int MB>
void dense_vectors(const float* x, long ldx, long K, const void* w, long n, float* tot, long& k) {
    constexpr int U = MB >= 8 ? V::REGS / 16 : MB >= 4 ? V::REGS / 8 : 4;  // MB·U ≤ half the registers
    constexpr int W = V::W;
    typename V::T acc[MB][U];
    for (int m = 0; m < MB; m++)
        for (int u = 0; u < U; u++) acc[m][u] = V::zero();
    for (; k + W * U <= K; k += W * U)
        for (int u = 0; u < U; u++) {
            const auto v = V::template weights<KIND>(w, n * K + k + W * u);
            for (int m = 0; m < MB; m++) acc[m][u] = V::fma(v, V::load(x + m * ldx + k + W * u), acc[m][u]);
        }
    for (; k + W <= K; k += W) {
        const auto v = V::template weights<KIND>(w, n * K + k);
        for (int m = 0; m < MB; m++) acc[m][0] = V::fma(v, V::load(x + m * ldx + k), acc[m][0]);
    }
    for (int m = 0; m < MB; m++) {
        for (int u = 1; u < U; u++) acc[m][0] = V::add(acc[m][0], acc[m][u]);
        tot[m] = V::sum(acc[m][0]);
    }
}

// y[m, n] = Σ_k x[m, k] · w[n, k] for MB activation rows (stride ldx), the widest vectors here, then the tail.
template <int KIND, int MB>
void dense_row(const float* x, long ldx, long K, const void* w, long n, float* y, long ldy) {
    long k = 0;
    float tot[MB];
#if defined(TY_AVX512)
    dense_vectors<Vec16, KIND, MB>(x, ldx, K, w, n, tot, k);
#elif defined(TY_AVX2)
    dense_vectors<Vec8, KIND, MB>(x, ldx, K, w, n, tot, k);
#else
    for (int m = 0; m < MB; m++) tot[m] = 0.f;
#endif
    for (; k < K; k++) {
        const float wv = wscalar<KIND>(w, n * K + k);
        for (int m = 0; m < MB; m++) tot[m] += wv * x[m * ldx + k];
    }
    for (int m = 0; m < MB; m++) y[m * ldy + n] = tot[m];
}

// Rows split statically between the threads (contiguous ranges).
template <int KIND, int MB>
void dense_region_mb(const float* x, long ldx, const Proj& p, float* y, long ldy) {
#pragma omp for schedule(static)
    for (long n = 0; n < p.N; n++) dense_row<KIND, MB>(x, ldx, p.K, p.w, n, y, ldy);
}

#ifdef TY_AVX2
// Several activation rows (batched decode, prefill): tiles of RM activation rows × RN weight rows. Each loaded
// weight vector meets RM activation vectors and each activation vector RN weight vectors, so a k-step is
// RM + RN loads for RM·RN FMAs (the row-at-a-time loop above: MB + 1 loads for MB FMAs, which the loads bound)
// and RM·RN independent accumulators hide the FMA latency. Tile sizes fill the vector registers:
// RM·RN accumulators + RN weight vectors + 1 activation vector.
template <class V>
constexpr int tile_rm() { return V::REGS >= 32 ? 8 : 4; }
template <class V>
constexpr int tile_rn(int rm) { return (V::REGS - 1) / (rm + 1) > 8 ? 8 : (V::REGS - 1) / (rm + 1); }

// y[m, n + j] = Σ_k x[m, k] · w[n + j, k] for m < RM, j < RN (the columns past whole vectors in scalar code).
template <class V, int KIND, int RM, int RN, bool PREFETCH = true>
void dense_tile(const float* x, long ldx, long K, const void* w, long n, float* y, long ldy) {
    constexpr int W = V::W;
    typename V::T acc[RM][RN];
    for (int m = 0; m < RM; m++)
        for (int j = 0; j < RN; j++) acc[m][j] = V::zero();
    constexpr long WB = KIND == KF32 ? 4 : 2;  // bytes per weight
    const char* ahead = static_cast<const char*>(w) + (n + RN) * K * WB;  // the next tile: the same offsets
    long k = 0;
    for (; k + W <= K; k += W) {
        if (PREFETCH && (k * WB) % 64 == 0)  // one hint per line of each row
            for (int j = 0; j < RN; j++) _mm_prefetch(ahead + (j * K + k) * WB, _MM_HINT_T0);
        typename V::T wv[RN];
        for (int j = 0; j < RN; j++) wv[j] = V::template weights<KIND>(w, (n + j) * K + k);
        for (int m = 0; m < RM; m++) {
            const auto xv = V::load(x + m * ldx + k);
            for (int j = 0; j < RN; j++) acc[m][j] = V::fma(wv[j], xv, acc[m][j]);
        }
    }
    for (int m = 0; m < RM; m++)
        for (int j = 0; j < RN; j++) {
            float t = V::sum(acc[m][j]);
            for (long kk = k; kk < K; kk++) t += wscalar<KIND>(w, (n + j) * K + kk) * x[m * ldx + kk];
            y[m * ldy + n + j] = t;
        }
}

// A tile of height min(RM, rows) (the last activation rows of a call may not fill one).
template <class V, int KIND, int RM, int RN>
void dense_tile_rows(const float* x, long ldx, long rows, long K, const void* w, long n, float* y, long ldy) {
    if (rows >= RM) dense_tile<V, KIND, RM, RN, RN != 1>(x, ldx, K, w, n, y, ldy);
    else if constexpr (RM > 1) dense_tile_rows<V, KIND, RM - 1, RN>(x, ldx, rows, K, w, n, y, ldy);
}

// Weight rows [n0, n1) against one tile height of activation rows (rows ≤ RM): RN weight rows at a time, then
// one at a time.
template <class V, int KIND, int RM>
void dense_tiles(const float* x, long ldx, long rows, long K, const void* w, long n0, long n1, float* y, long ldy) {
    constexpr int RN = tile_rn<V>(RM);
    long n = n0;
    for (; n + RN <= n1; n += RN) dense_tile_rows<V, KIND, RM, RN>(x, ldx, rows, K, w, n, y, ldy);
    for (; n < n1; n++) dense_tile_rows<V, KIND, RM, 1>(x, ldx, rows, K, w, n, y, ldy);
}

// Inside a parallel region: the weights in chunks of rows that stay in L2 (~192 KiB, and at least one chunk
// per thread), chunks split statically between the threads; within a chunk, every RM activation rows meet its
// rows tile by tile. The weights come from memory once for all M rows (prefetched a tile ahead: a tile's rows
// are short streams the hardware prefetcher misses), the activations once per chunk.
template <class V, int KIND>
void dense_tiled(const float* x, long ldx, long M, const Proj& p, float* y, long ldy, int nt) {
    constexpr int RM = tile_rm<V>(), RN = tile_rn<V>(RM);
    const long K = p.K, N = p.N, wbytes = KIND == KF32 ? 4 : 2;
    const long fit = std::max<long>(1, (192 << 10) / (K * wbytes) / RN) * RN;
    const long share = (N + nt - 1) / nt;
    const long nc = std::max<long>(RN, std::min(fit, (share + RN - 1) / RN * RN));
    const long chunks = (N + nc - 1) / nc;
#pragma omp for schedule(static)
    for (long c = 0; c < chunks; c++) {
        const long n0 = c * nc, n1 = std::min(N, n0 + nc);
        for (long m = 0; m < M; m += RM) dense_tiles<V, KIND, RM>(x + m * ldx, ldx, M - m, K, p.w, n0, n1, y + m * ldy, ldy);
    }
}
#endif

template <int KIND>
void dense_region(const float* x, long ldx, long M, const Proj& p, float* y, long ldy) {
    // Tiles only where the activation rows one weight pass serves (≤ 8) do not fit in L1: while they do, the
    // row loop below (each weight vector meets them all from L1) is as fast or faster (measured A/B)
    const bool tiled = M > 1 && std::min<long>(M, 8) * p.K * (long)sizeof(float) > (24 << 10);
#if defined(TY_AVX512)
    if (tiled) return dense_tiled<Vec16, KIND>(x, ldx, M, p, y, ldy, omp_get_num_threads());
#elif defined(TY_AVX2)
    if (tiled) return dense_tiled<Vec8, KIND>(x, ldx, M, p, y, ldy, omp_get_num_threads());
#endif
    for (long m0 = 0; m0 < M;) {  // one pass over the weights per 8 activation rows
        const long left = M - m0;
        const float* xm = x + m0 * ldx;
        float* ym = y + m0 * ldy;
        if (left >= 8) dense_region_mb<KIND, 8>(xm, ldx, p, ym, ldy), m0 += 8;
        else if (left >= 4) dense_region_mb<KIND, 4>(xm, ldx, p, ym, ldy), m0 += 4;
        else if (left >= 2) dense_region_mb<KIND, 2>(xm, ldx, p, ym, ldy), m0 += 2;
        else dense_region_mb<KIND, 1>(xm, ldx, p, ym, ldy), m0 += 1;
    }
}

// ------------------------------------------------------------------------------------------ around them
// out[m, f] = silu(x[m, f]) · x[m, goff + f] (gate and up side by side in one row)
void swiglu(const float* x, long ldx, long goff, float* out, long M, long F) {
    for (long m = 0; m < M; m++)
        for (long f = 0; f < F; f++) {
            const float a = x[m * ldx + f];
            out[m * F + f] = a / (1.f + std::exp(-a)) * x[m * ldx + goff + f];
        }
}

// Inside a parallel region: y[:, columns of ps[i]] = xin · Wᵢᵀ for the n weights (side by side, each Wᵢ's N8 —
// dense: N — columns), then y[:, :N of W0] += add. Quantized weights need ld == K.
void products(const float* xin, long ld, long M, const Proj* const* ps, int n, float* y, long ldy, const float* add,
              long ldadd, Act& act) {
    long col = 0;
    for (int i = 0; i < n; i++) {
        const Proj& p = *ps[i];
        float* yi = y + col;
        switch (p.kind) {
            case KF32: dense_region<KF32>(xin, ld, M, p, yi, ldy); break;
            case KBF16: dense_region<KBF16>(xin, ld, M, p, yi, ldy); break;
            case KF16: dense_region<KF16>(xin, ld, M, p, yi, ldy); break;
            default: {  // q/k/v (gate/up) of one spec share the rounded activations
                const Proj* q = i ? ps[i - 1] : nullptr;
                const bool same = q && q->kind == p.kind && q->kb == p.kb && q->perm == p.perm && q->K == p.K;
                gemm_region(xin, M, p, yi, ldy, act, same);
            }
        }
        col += p.kind >= KI8 ? p.N8 : p.N;
    }
    if (add) {  // (the products' `omp for` ended with a barrier: every output is there)
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++)
            for (long c = 0; c < ps[0]->N; c++) y[m * ldy + c] += add[m * ldadd + c];
    }
}

inline long width(const Proj& p) { return p.kind >= KI8 ? p.N8 : p.N; }

inline float load_c(const float* p) { return *p; }
inline float load_c(const uint16_t* p) { return bf16_to_float(*p); }

// out[m] = x[m] · rsqrt(eps + Σ x[m]² / K) · w (the model's RMSNorm, in fp32; w fp32, or bf16 when wbf16)
void rmsnorm(const float* x, long ldx, const void* w, int wbf16, float eps, float* out, long M, long K) {
    for (long m = 0; m < M; m++) {
        const float* xm = x + m * ldx;
        float ss = 0.f;
        for (long d = 0; d < K; d++) ss += xm[d] * xm[d];
        const float r = 1.f / std::sqrt(eps + ss * (1.f / (float)K));
        for (long d = 0; d < K; d++) {
            const float wd = wbf16 ? load_c(static_cast<const uint16_t*>(w) + d) : static_cast<const float*>(w)[d];
            out[m * K + d] = wd * (xm[d] * r);
        }
    }
}
inline void store_c(float* p, float v) { *p = v; }
inline void store_c(uint16_t* p, float v) {  // fp32 → bf16, round to nearest even (as torch's .to(bfloat16))
    uint32_t b;
    std::memcpy(&b, &v, 4);
    if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu)) { *p = (uint16_t)((b >> 16) | 0x40); return; }  // NaN
    b += 0x7fffu + ((b >> 16) & 1u);
    *p = (uint16_t)(b >> 16);
}

// dot(q, k) over HD and o += w · v, the cache in fp32 or bf16
template <typename C>
inline float dot_c(const float* q, const C* k, long HD) {
    long e = 0;
    float d = 0.f;
#ifdef TY_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (; e + 8 <= HD; e += 8) {
        __m256 kv;
        if constexpr (sizeof(C) == 4) kv = _mm256_loadu_ps(reinterpret_cast<const float*>(k) + e);
        else kv = wload<KBF16>(k, e);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), kv, acc);
    }
    d = hsum(acc);
#endif
    for (; e < HD; e++) d += q[e] * load_c(k + e);
    return d;
}

template <typename C>
inline void axpy_c(float w, const C* v, float* o, long HD) {
    long e = 0;
#ifdef TY_AVX2
    const __m256 wv = _mm256_set1_ps(w);
    for (; e + 8 <= HD; e += 8) {
        __m256 vv;
        if constexpr (sizeof(C) == 4) vv = _mm256_loadu_ps(reinterpret_cast<const float*>(v) + e);
        else vv = wload<KBF16>(v, e);
        _mm256_storeu_ps(o + e, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(o + e)));
    }
#endif
    for (; e < HD; e++) o[e] += w * load_c(v + e);
}

// One step operation (ops/__init__.py's `Op`, one layout for all kinds; a kind reads only its own fields).
enum { OP_LINEAR = 0, OP_ATTEND = 1, OP_MLP = 2 };
struct Op {
    int kind;
    int pre;          // linear: 0 none, 1 RMSNorm (weight norm, eps), 2 SwiGLU (up from column goff); attend: bf16 cache
    int nbf16;        // the RMSNorm weight is bf16 (else fp32)
    float eps;
    float* x;         // input rows, row stride ldx (attend: qkv, its q and k heads rotated in place)
    long M, ldx;
    const void* norm;
    long goff, voff;  // linear: SwiGLU's up column; attend: the keys' and values' first columns in qkv
    const Proj* p[3];  // linear: W0..W2; mlp: gate, up, down; attend: the output projection or null
    float* y;         // output [M, ldy] (attend without a projection: [M, H·HD])
    long ldy;
    const float* add;  // residual [M, ldadd] added to the (first) projection's N outputs, or null
    long ldadd;
    long H, KVH, HD;  // attend: query heads, KV heads, head width
    const float* cos;  // cos / signed sin [M or 1, HD], row stride ldcs (0: one row for all)
    const float* sin;
    long ldcs;
    void* kc;         // this layer's key / value cache rows: row m at kc + m·rs, [KVH, L, HD]
    void* vc;
    long rs, L;
    const long* pos;  // each row's write slot (= its length before this token)
};

// Scratch floats an op needs (shared by the threads; ops run one after the other, so they reuse it).
long scratch_of(const Op& op) {
    if (op.kind == OP_LINEAR) return op.pre ? op.M * op.p[0]->K : 0;
    if (op.kind == OP_MLP) return op.M * (op.p[0]->K + width(*op.p[0]) + width(*op.p[1]) + op.p[2]->K);
    return op.p[0] ? op.M * op.H * op.HD : 0;
}

// The bodies below are run by every thread of ty_run's parallel region; each ends with a barrier (the implicit
// one of its last `omp for` / `single`), so the next op sees all of its outputs.
void linear_body(const Op& op, float* h, Act& act) {
    const long K = op.p[0]->K;
    const float* xin = op.x;
    long ld = op.ldx;
    if (op.pre) {
#pragma omp single
        {
            if (op.pre == 1) rmsnorm(op.x, op.ldx, op.norm, op.nbf16, op.eps, h, op.M, K);
            else swiglu(op.x, op.ldx, op.goff, h, op.M, K);
        }
        xin = h;
        ld = K;
    }
    products(xin, ld, op.M, op.p, op.p[2] ? 3 : op.p[1] ? 2 : 1, op.y, op.ldy, op.add, op.ldadd, act);
}

// A block's MLP: y = add + (silu(h·Gᵀ) · h·Uᵀ) · Dᵀ with h = RMSNorm(x).
void mlp_body(const Op& op, float* scratch, Act& act) {
    const Proj *g = op.p[0], *u = op.p[1], *d = op.p[2];
    const long M = op.M, K = g->K, F = d->K, wgu = width(*g) + width(*u);
    float *h = scratch, *gu = h + M * K, *a = gu + M * wgu;
#pragma omp single
    rmsnorm(op.x, op.ldx, op.norm, op.nbf16, op.eps, h, M, K);
    products(h, K, M, op.p, 2, gu, wgu, nullptr, 0, act);
#pragma omp single
    swiglu(gu, wgu, width(*g), a, M, F);
    products(a, F, M, &op.p[2], 1, op.y, op.ldy, op.add, op.ldadd, act);
}

// One new token per row m: RoPE (rotate-half, signed sin) on its q and k heads, k and v written at slot pos[m]
// of its cache row, then every query head attends to slots 0..pos[m] of its KV head (GQA: consecutive query
// heads share one) → out [M, H·HD]. tmp, p: this thread's [HD] and [longest row] temporaries.
template <typename C>
void attend_body(const Op& op, float* out, std::vector<float>& tmp, std::vector<float>& p) {
    const long M = op.M, ldq = op.ldx, H = op.H, KVH = op.KVH, HD = op.HD, half = HD / 2, rep = H / KVH;
    const float scale = 1.f / std::sqrt((float)HD);
    float* qkv = op.x;
    C* kc = static_cast<C*>(op.kc);
    C* vc = static_cast<C*>(op.vc);
#pragma omp for schedule(static)
    for (long mh = 0; mh < M * (H + KVH); mh++) {
        const long m = mh / (H + KVH), h = mh % (H + KVH);
        float* t = h < H ? qkv + m * ldq + h * HD : qkv + m * ldq + op.goff + (h - H) * HD;
        const float* cm = op.cos + m * op.ldcs;
        const float* sm = op.sin + m * op.ldcs;
        for (long d = 0; d < HD; d++) tmp[d] = t[d];
        for (long d = 0; d < half; d++) t[d] = tmp[d] * cm[d] + tmp[d + half] * sm[d];  // (no % in the loop)
        for (long d = half; d < HD; d++) t[d] = tmp[d] * cm[d] + tmp[d - half] * sm[d];
        if (h >= H) {  // store the rotated key and its value
            const long g = h - H;
            C* kd = kc + m * op.rs + (g * op.L + op.pos[m]) * HD;
            C* vd = vc + m * op.rs + (g * op.L + op.pos[m]) * HD;
            const float* vs = qkv + m * ldq + op.voff + g * HD;
            for (long d = 0; d < HD; d++) store_c(kd + d, t[d]), store_c(vd + d, vs[d]);
        }
    }
#pragma omp for schedule(static)
    for (long mh = 0; mh < M * H; mh++) {
        const long m = mh / H, h = mh % H, g = h / rep, S = op.pos[m] + 1;
        const float* qh = qkv + m * ldq + h * HD;
        const C* kh = kc + m * op.rs + g * op.L * HD;
        const C* vh = vc + m * op.rs + g * op.L * HD;
        float mx = -INFINITY;
        for (long j = 0; j < S; j++) {
            p[j] = dot_c(qh, kh + j * HD, HD) * scale;
            mx = std::max(mx, p[j]);
        }
        float den = 0.f;
        for (long j = 0; j < S; j++) {
            p[j] = std::exp(p[j] - mx);
            den += p[j];
        }
        float* o = out + m * H * HD + h * HD;
        for (long e = 0; e < HD; e++) o[e] = 0.f;
        const float inv = 1.f / den;
        for (long j = 0; j < S; j++) axpy_c(p[j] * inv, vh + j * HD, o, HD);
    }
}

}  // namespace

extern "C" {

// x [M, K] fp32 contiguous; activation block kb (a multiple of 16 dividing K, ≤ 256); y [M, N8] fp32, N8 = N
// rounded up to 8. int8: w canonical int8 [N, K], s/o fp32 [N8] (o = 128 − z, or null when symmetric).
void ty_gemm_i8(const float* x, long M, long K, long kb, const int8_t* w, long N, const float* s, const float* o,
                float* y, long N8, int nt) {
    gemm(x, M, Proj{w, s, o, nullptr, N, N8, K, kb, 1, KI8, nullptr}, y, nt);
}

// int4: w canonical nibbles [N, K/2], s fp16 bits / z uint8 [N8/8][G][8]; kb a multiple of 16 dividing the
// group size K / G.
void ty_gemm_i4(const float* x, long M, long K, long kb, const uint8_t* w, long N, const uint16_t* s,
                const uint8_t* z, long G, float* y, long N8, int nt) {
    gemm(x, M, Proj{w, s, nullptr, z, N, N8, K, kb, G, KI4, nullptr}, y, nt);
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
        for (long g = 0; g < G; g++) {
            const float sg = half_to_float(s[g * N + n]), zg = (float)z[g * N + n];
            long k = g * gs;
            const long k1 = k + gs;
#ifdef TY_AVX2  // 16 columns per step, the same arithmetic: (q − z) exact in fp32, then one rounding by · s
            const __m256 vs = _mm256_set1_ps(sg), vz = _mm256_set1_ps(zg);
            const __m128i low = _mm_set1_epi8(0x0f);
            for (; k + 16 <= k1; k += 16) {
                const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wn + k / 2));
                const __m128i q = _mm_unpacklo_epi8(_mm_and_si128(v, low), _mm_and_si128(_mm_srli_epi16(v, 4), low));
                const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
                _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_sub_ps(a, vz), vs));
                _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(_mm256_sub_ps(b, vz), vs));
            }
#endif
            for (; k < k1; k++) {
                const uint8_t v = wn[k / 2];
                o[k] = ((float)(k % 2 ? v >> 4 : v & 15) - zg) * sg;
            }
        }
    }
}

// The width of the vectors this build computes with: 16 (AVX-512), 8 (AVX2) or 1 (the portable scalar code).
int ty_simd() {
#if defined(TY_AVX512)
    return 16;
#elif defined(TY_AVX2)
    return 8;
#else
    return 1;
#endif
}

// Runs n ops in order in one parallel region of nt threads: a decode step recorded once (ops.Graph) costs
// one call and one fork/join instead of one per op. Each op reads and writes only its own operands.
void ty_run(const Op* ops, long n, int nt) {
    long need = 0, hd = 1, len = 1;
    for (long i = 0; i < n; i++) {
        need = std::max(need, scratch_of(ops[i]));
        if (ops[i].kind == OP_ATTEND) {
            hd = std::max(hd, ops[i].HD);
            for (long m = 0; m < ops[i].M; m++) len = std::max(len, ops[i].pos[m] + 1);
        }
    }
    std::vector<float> scratch(need);
    Act act;
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> tmp(hd), p(len);
        for (long i = 0; i < n; i++) {
            const Op& op = ops[i];
            if (op.kind == OP_LINEAR) {
                linear_body(op, scratch.data(), act);
            } else if (op.kind == OP_MLP) {
                mlp_body(op, scratch.data(), act);
            } else {
                float* out = op.p[0] ? scratch.data() : op.y;
                if (op.pre) attend_body<uint16_t>(op, out, tmp, p);
                else attend_body<float>(op, out, tmp, p);
                if (op.p[0]) products(out, op.H * op.HD, op.M, op.p, 1, op.y, op.ldy, op.add, op.ldadd, act);
            }
        }
    }
}

}  // extern "C"
