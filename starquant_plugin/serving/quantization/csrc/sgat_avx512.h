/* The AVX-512 row passes of `starquant::sgat_quantize` (sgat_avx512.c), used by sgat_cpu.c's
 * `quantize` where the CPU has AVX-512 F/BW and the row is whole 16-column vectors. */
#pragma once
#include <stdint.h>

/* Whether this CPU runs them (AVX-512 F and BW; cached). */
int sgat_avx512_supported(void);

/* Row `row` of x (bf16 when `bf16`, else float32; `width` columns, a multiple of 16) minus
 * `shift`, each rotation block of `block` columns (16 to 1024, a power of two; 0: none) rotated
 * by the orthonormal Hadamard, into v (64-byte aligned); returns the row's |max|. */
float sgat_avx512_load_rotate(const void *x, int bf16, int64_t row, int64_t width, int64_t block, const float *shift,
                              float *v);

/* codes = round-half-even(v / scale) clamped to [-qmax, qmax]: int8, or bf16 integers. */
void sgat_avx512_store_codes(const float *v, int64_t width, float scale, float qmax, int8_t *out);
void sgat_avx512_store_codes_bf16(const float *v, int64_t width, float scale, float qmax, uint16_t *out);
