/* W4A8 GEMM on AVX512-VNNI CPUs without AMX (AMD Zen 4/5, Intel Ice Lake and Cascade Lake):
 * int8 activation codes times packed int4 weights, integer dot products (`vpdpbusd`), exact
 * int32 sums per weight group, float32 group scales, then per-row scales and SGAT's per-state
 * compensation in the same pass. Built into `_sgat_cpu` (setup.py); `int4_vnni_mm` in sgat_cpu.c
 * is its Python entry, `starquant::int4_mm` (ops.py) its op.
 *
 *   out[r, c] = row_scale[r] * sum_g scale[g, c] * sum_{k in g} codes[r, k] * w[c, k]  + table[state[r], c]
 *
 * Weights are stored unsigned (w + 8 in [0, 15]; `vpdpbusd` multiplies unsigned by signed bytes),
 * and each group's sum loses 8 * (the row's code sum over the group) to undo the offset. Layout of
 * `packed` ([n / 16, k / 8, 16, 4] bytes): for columns c0..c0+15 and inputs k0..k0+7, byte
 * [c, i] = (w[c0 + c, k0 + i] + 8) | (w[c0 + c, k0 + 4 + i] + 8) << 4, so one 64-byte load gives two
 * 16 x 4 operand tiles (the low and the high nibbles). `pack_int4_vnni` (ops.py) writes it.
 *
 * Work: panels of 32 output columns (2 vectors) split over OpenMP threads (torch's, as in
 * sgat_cpu.c); a panel's weights stay in L2 while tiles of 8 rows run the whole input width with
 * 16 int32 accumulators in registers. Measured 1.8x the bf16 GEMM (oneDNN, AVX512-BF16) at 512
 * tokens on an AMD EPYC (Zen 4), on a par with vLLM's oneDNN int8 GEMM (docs/performance.md).
 */
#include "int4_vnni.h"
#include "vec16.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI_KERNEL 1
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define VNNI_KERNEL 0
#endif

enum { ROWS = 8, VECTORS = 2, PANEL = 16 * VECTORS };

int int4_vnni_supported(void) {
#if VNNI_KERNEL
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

#if VNNI_KERNEL

/* Two dot-product steps of tile row R into its accumulators c<R>0 (columns 0-15) and c<R>1 (16-31). */
#define ROW_STEP(R)                                                                                     \
    do {                                                                                                \
        int32_t first_, second_;                                                                        \
        memcpy(&first_, a + 64 * j + 8 * (R), 4);                                                       \
        memcpy(&second_, a + 64 * j + 8 * (R) + 4, 4);                                                  \
        const __m512i x0_ = _mm512_set1_epi32(first_), x1_ = _mm512_set1_epi32(second_);                \
        c##R##0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##R##0, lo0, x0_), hi0, x1_);                \
        c##R##1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c##R##1, lo1, x0_), hi1, x1_);                \
    } while (0)

/* A group's int32 sums of tile row R, less the weights' offset, times the group scales, into sums. */
#define ROW_FLUSH(R)                                                                                    \
    do {                                                                                                \
        const __m512i offset_ = _mm512_set1_epi32(8 * code_sums[(R) * groups + g]);                     \
        float *into_ = sums + (R) * PANEL;                                                              \
        _mm512_storeu_ps(into_, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##R##0, offset_)), \
                                                s0, _mm512_loadu_ps(into_)));                           \
        _mm512_storeu_ps(into_ + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c##R##1, offset_)), \
                                                     s1, _mm512_loadu_ps(into_ + 16)));                 \
    } while (0)

/* Tile `tile_index` (8 rows; rows past m are zero codes, not stored) times the output columns
 * [col, col + 32): 16 int32 accumulators in registers over each weight group. */
VNNI_TARGET static void tile(const Int4VnniTask *t, int64_t tile_index, int64_t col) {
    const int64_t k = t->k, steps = t->group / 8, groups = t->k / t->group, row = tile_index * ROWS;
    const uint8_t *w0 = t->packed + (col / 16) * (k / 8) * 64, *w1 = w0 + (k / 8) * 64;
    const int8_t *a = t->tiles + tile_index * k * ROWS; /* [k / 8, 8 rows, 8 codes] */
    const int32_t *code_sums = t->code_sums + row * groups;
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    float sums[ROWS * PANEL] __attribute__((aligned(64))) = {0};
    for (int64_t g = 0; g < groups; g++) {
        __m512i c00 = _mm512_setzero_si512(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
                c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
        for (int64_t j = g * steps; j < (g + 1) * steps; j++) {
            const __m512i p0 = _mm512_loadu_si512(w0 + j * 64), p1 = _mm512_loadu_si512(w1 + j * 64);
            const __m512i lo0 = _mm512_and_si512(p0, nibble), hi0 = _mm512_and_si512(_mm512_srli_epi16(p0, 4), nibble);
            const __m512i lo1 = _mm512_and_si512(p1, nibble), hi1 = _mm512_and_si512(_mm512_srli_epi16(p1, 4), nibble);
            ROW_STEP(0);
            ROW_STEP(1);
            ROW_STEP(2);
            ROW_STEP(3);
            ROW_STEP(4);
            ROW_STEP(5);
            ROW_STEP(6);
            ROW_STEP(7);
        }
        const __m512 s0 = _mm512_loadu_ps(t->scales + g * t->n + col), s1 = _mm512_loadu_ps(t->scales + g * t->n + col + 16);
        ROW_FLUSH(0);
        ROW_FLUSH(1);
        ROW_FLUSH(2);
        ROW_FLUSH(3);
        ROW_FLUSH(4);
        ROW_FLUSH(5);
        ROW_FLUSH(6);
        ROW_FLUSH(7);
    }
    for (int r = 0; r < ROWS && row + r < t->m; r++) {
        const int64_t out_row = row + r;
        const __m512 scale = _mm512_set1_ps(t->row_scales ? t->row_scales[out_row] : 1.0f);
        const int64_t state = t->table && t->states[out_row] ? 1 : 0;
        for (int v = 0; v < VECTORS; v++) {
            const int64_t c = col + 16 * v, at = out_row * t->n + c;
            __m512 value = _mm512_mul_ps(_mm512_load_ps(sums + r * PANEL + 16 * v), scale);
            if (t->bf16) {
                if (t->table) value = _mm512_add_ps(value, (__m512)widen16((const uint16_t *)t->table + state * t->n + c));
                narrow16((v16f)value, (uint16_t *)t->out + at);
            } else {
                if (t->table) value = _mm512_add_ps(value, _mm512_loadu_ps((const float *)t->table + state * t->n + c));
                _mm512_storeu_ps((float *)t->out + at, value);
            }
        }
    }
}

/* Row tiles [begin, end): the codes regrouped tile by tile as [k / 8, 8 rows, 8 codes] (zero rows
 * past m), so a tile reads one cache line per 8 inputs instead of 8 rows k bytes apart (which
 * share cache sets when k is a multiple of 4096); and each row's code sum per group (the
 * unsigned weights' offset correction). */
VNNI_TARGET static void prepare_tiles(const Int4VnniTask *t, int64_t begin, int64_t end) {
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t groups = t->k / t->group;
    for (int64_t tile_index = begin; tile_index < end; tile_index++) {
        int8_t *tile_codes = t->tiles + tile_index * t->k * ROWS;
        for (int r = 0; r < ROWS; r++) {
            const int64_t row = tile_index * ROWS + r;
            if (row >= t->m) {
                for (int64_t j = 0; j < t->k / 8; j++) memset(tile_codes + 64 * j + 8 * r, 0, 8);
                for (int64_t g = 0; g < groups; g++) t->code_sums[row * groups + g] = 0;
                continue;
            }
            const int8_t *a = t->codes + row * t->k;
            for (int64_t j = 0; j < t->k / 8; j++) memcpy(tile_codes + 64 * j + 8 * r, a + 8 * j, 8);
            for (int64_t g = 0; g < groups; g++) {
                __m512i acc = _mm512_setzero_si512();
                int64_t i = g * t->group;
                for (; i + 64 <= (g + 1) * t->group; i += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(a + i));
                int32_t sum = _mm512_reduce_add_epi32(acc);
                for (; i < (g + 1) * t->group; i++) sum += a[i];
                t->code_sums[row * groups + g] = sum;
            }
        }
    }
}

VNNI_TARGET static void panel(const Int4VnniTask *t, int64_t col) {
    for (int64_t tile_index = 0; tile_index * ROWS < t->m; tile_index++) tile(t, tile_index, col);
}

int int4_vnni_mm(const Int4VnniTask *task, int threads) {
    if (!int4_vnni_supported() || task->n % PANEL || task->group % 8 || task->k % task->group) return 1;
    const int64_t panels = task->n / PANEL;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        const int64_t tiles = (task->m + ROWS - 1) / ROWS;
        prepare_tiles(task, tiles * t / count, tiles * (t + 1) / count);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) panel(task, p * PANEL);
    }
    return 0;
}

#else

int int4_vnni_mm(const Int4VnniTask *task, int threads) {
    (void)task;
    (void)threads;
    return 1;
}

#endif
