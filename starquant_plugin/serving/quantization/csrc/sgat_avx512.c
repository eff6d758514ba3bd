/* AVX-512 row passes of `starquant::sgat_quantize` on CPU (sgat_cpu.c holds the op, its
 * portable vector code and the row loop; this file only its two passes over a row in AVX-512
 * intrinsics). The same operations in the same order as the portable code: the butterfly stages
 * inside a vector compute x * (+-1) + partner with one fused multiply-add (the product is exact,
 * so one rounding either way); the codes round with the CPU's default mode (half to even) as
 * `irintf` does. NaN inputs aside (their bf16 codes differ), the codes and scales are the
 * portable code's, bit for bit. What it saves over GCC's lowering of the portable code: one
 * instruction to widen bf16 (GCC splits it in four), the fused butterflies, and full 512-bit code
 * stores (GCC narrows in 256-bit halves): 1.6-1.8x on the whole op at LLaDA-8B's widths on an
 * AMD EPYC (Zen 4) (docs/performance.md). */
#include "sgat_avx512.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX512_KERNEL 1
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
#define INLINE static inline __attribute__((always_inline))
#else
#define AVX512_KERNEL 0
#endif

int sgat_avx512_supported(void) {
#if AVX512_KERNEL
    static int supported = -1;
    if (supported < 0) {
        __builtin_cpu_init();
        supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    }
    return supported;
#else
    return 0;
#endif
}

#if AVX512_KERNEL

/* 16 inputs from x[offset:] in float32, minus the shift. */
AVX512_TARGET INLINE __m512 load16(const void *x, int bf16, int64_t offset, const float *shift) {
    const __m512 value =
        bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + offset))), 16))
             : _mm512_loadu_ps((const float *)x + offset);
    return _mm512_sub_ps(value, _mm512_loadu_ps(shift));
}

/* Butterfly stages of half-width 1, 2, 4, 8 inside one vector: lane j takes x[j] * (j & h ? -1 :
 * 1) + x[j ^ h], i.e. (a + c, a - c) per pair. */
AVX512_TARGET INLINE __m512 in_vector_stages(__m512 x) {
    const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
    const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
    const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
    const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
    x = _mm512_fmadd_ps(x, s1, _mm512_permute_ps(x, 0xb1));       /* partner j ^ 1 */
    x = _mm512_fmadd_ps(x, s2, _mm512_permute_ps(x, 0x4e));       /* j ^ 2 */
    x = _mm512_fmadd_ps(x, s4, _mm512_shuffle_f32x4(x, x, 0xb1)); /* j ^ 4 */
    return _mm512_fmadd_ps(x, s8, _mm512_shuffle_f32x4(x, x, 0x4e)); /* j ^ 8 */
}

/* One rotation block of `vectors` vectors into v, returning the running |max| bits per lane;
 * inlined with a constant `vectors`, so small blocks stay in registers. */
AVX512_TARGET INLINE __m512i rotate_block(const void *x, int bf16, int64_t offset, const float *shift, float *v,
                                          const int64_t vectors, __m512 norm, __m512i absmax) {
    __m512 r[64];
    for (int64_t k = 0; k < vectors; k++) r[k] = in_vector_stages(load16(x, bf16, offset + 16 * k, shift + 16 * k));
#pragma GCC unroll 8
    for (int64_t half = 1; half < vectors; half *= 2)
#pragma GCC unroll 16
        for (int64_t i = 0; i < vectors; i += 2 * half)
#pragma GCC unroll 16
            for (int64_t j = i; j < i + half; j++) {
                const __m512 a = r[j], c = r[j + half];
                r[j] = _mm512_add_ps(a, c);
                r[j + half] = _mm512_sub_ps(a, c);
            }
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    for (int64_t k = 0; k < vectors; k++) {
        const __m512 value = _mm512_mul_ps(r[k], norm);
        _mm512_store_ps(v + 16 * k, value);
        absmax = _mm512_max_epu32(absmax, _mm512_and_si512(_mm512_castps_si512(value), magnitude));
    }
    return absmax;
}

AVX512_TARGET float sgat_avx512_load_rotate(const void *x, int bf16, int64_t row, int64_t width, int64_t block,
                                            const float *shift, float *v) {
    __m512i absmax = _mm512_setzero_si512();
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    if (!block) {
        for (int64_t c = 0; c < width; c += 16) {
            const __m512 value = load16(x, bf16, row * width + c, shift + c);
            _mm512_store_ps(v + c, value);
            absmax = _mm512_max_epu32(absmax, _mm512_and_si512(_mm512_castps_si512(value), magnitude));
        }
    } else {
        const __m512 norm = _mm512_set1_ps(1.0f / sqrtf((float)block));
        for (int64_t start = 0; start < width; start += block) {
            const int64_t offset = row * width + start;
            switch (block / 16) {
                case 1: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 1, norm, absmax); break;
                case 2: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 2, norm, absmax); break;
                case 4: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 4, norm, absmax); break;
                case 8: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 8, norm, absmax); break;
                case 16: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 16, norm, absmax); break;
                case 32: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 32, norm, absmax); break;
                default: absmax = rotate_block(x, bf16, offset, shift + start, v + start, 64, norm, absmax); break;
            }
        }
    }
    float lanes[16], result = 0.0f; /* as the portable code reduces its lanes (a NaN lane is skipped) */
    _mm512_storeu_si512(lanes, absmax);
    for (int l = 0; l < 16; l++) result = lanes[l] > result ? lanes[l] : result;
    return result;
}

/* round-half-even(v * (1 / scale)) clamped to [-qmax, qmax], 16 at a time. */
AVX512_TARGET INLINE __m512i codes16(const float *v, __m512 inverse, __m512i top) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(v), inverse));
    return _mm512_max_epi32(_mm512_min_epi32(q, top), _mm512_sub_epi32(_mm512_setzero_si512(), top));
}

AVX512_TARGET void sgat_avx512_store_codes(const float *v, int64_t width, float scale, float qmax, int8_t *out) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i top = _mm512_set1_epi32((int32_t)qmax);
    for (int64_t c = 0; c < width; c += 16) _mm_storeu_si128((__m128i *)(out + c), _mm512_cvtepi32_epi8(codes16(v + c, inverse, top)));
}

AVX512_TARGET void sgat_avx512_store_codes_bf16(const float *v, int64_t width, float scale, float qmax, uint16_t *out) {
    const __m512 inverse = _mm512_set1_ps(1.0f / scale);
    const __m512i top = _mm512_set1_epi32((int32_t)qmax);
    for (int64_t c = 0; c < width; c += 16) {
        const __m512i bits = _mm512_castps_si512(_mm512_cvtepi32_ps(codes16(v + c, inverse, top)));
        _mm256_storeu_si256((__m256i *)(out + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16))); /* exact */
    }
}

#else

float sgat_avx512_load_rotate(const void *x, int bf16, int64_t row, int64_t width, int64_t block, const float *shift,
                              float *v) {
    (void)x, (void)bf16, (void)row, (void)width, (void)block, (void)shift, (void)v;
    return 0.0f;
}
void sgat_avx512_store_codes(const float *v, int64_t width, float scale, float qmax, int8_t *out) {
    (void)v, (void)width, (void)scale, (void)qmax, (void)out;
}
void sgat_avx512_store_codes_bf16(const float *v, int64_t width, float scale, float qmax, uint16_t *out) {
    (void)v, (void)width, (void)scale, (void)qmax, (void)out;
}

#endif
