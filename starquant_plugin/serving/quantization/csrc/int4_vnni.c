/* W4A8 GEMM on CPUs without AMX: int8 activation codes times packed int4 weights, integer dot
 * products, exact int32 sums per weight group, float32 group scales, then per-row scales and
 * SGAT's per-state compensation in the same pass. Two kernels read the same packed weights:
 * AVX512-VNNI (`vpdpbusd`: AMD Zen 4/5, Intel Ice Lake and later) and AVX2 (`vpmaddubsw` +
 * `vpmaddwd`: any x86-64-v3 CPU, e.g. AMD Zen 2/3). Built into `_sgat_cpu` (setup.py);
 * `int4_vnni_mm` in sgat_cpu.c is their Python entry, `starquant::int4_mm` (ops.py) their op.
 *
 *   out[r, c] = row_scale[r] * sum_g scale[g, c] * sum_{k in g} codes[r, k] * w[c, k]  + table[state[r], c]
 *
 * Weights are stored unsigned (w + 8 in [0, 15]; both instructions multiply unsigned by signed
 * bytes), and each group's sum loses 8 * (the row's code sum over the group) to undo the offset.
 * Layout of `packed` ([n / 16, k / 8, 16, 4] bytes): for columns c0..c0+15 and inputs k0..k0+7,
 * byte [c, i] = (w[c0 + c, k0 + i] + 8) | (w[c0 + c, k0 + 4 + i] + 8) << 4, so one 64-byte load
 * gives two 16 x 4 operand tiles (the low and the high nibbles; AVX2 takes 8 columns, 32 bytes, at
 * a time). `pack_int4_vnni` (ops.py) writes it. With AVX2, `vpmaddubsw` sums two products into
 * int16 (at most 2 * 15 * 128 in magnitude), the two nibbles' sums are added in int16 (7,680 at
 * most: no saturation), and `vpmaddwd` by ones widens to the four-product int32 sums `vpdpbusd`
 * gives: the same exact integers.
 *
 * Work: panels of 32 output columns split over OpenMP threads (torch's, as in sgat_cpu.c); a
 * panel's weights stay in L2 while tiles of 8 rows run the whole input width with the int32
 * accumulators in registers (VNNI: 8 rows x 32 columns; AVX2: 8 rows x 8 columns, four times);
 * the last tile of m = 8q + r rows runs r rows only (at m = 33, a cached decoding step's block,
 * 19% faster than 8 rows with 7 of zeros).
 * Measured (docs/performance.md), AVX512-VNNI: 1.8x the bf16 GEMM (oneDNN, AVX512-BF16) at 512
 * tokens on an AMD EPYC (Zen 4), on a par with vLLM's oneDNN int8 GEMM.
 */
#include "int4_vnni.h"
#include "vec16.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define X86_KERNELS 1
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#else
#define X86_KERNELS 0
#endif

enum { ROWS = 8, VECTORS = 2, PANEL = 16 * VECTORS };

int int4_mm_kernels(void) {
#if X86_KERNELS
    __builtin_cpu_init();
    int kernels = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) kernels |= INT4_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        kernels |= INT4_AVX512_VNNI;
    return kernels;
#else
    return 0;
#endif
}

#if X86_KERNELS

/* Row tiles [begin, end): the codes regrouped tile by tile as [k / 8, 8 rows, 8 codes] (zero rows
 * past m), so a tile reads one cache line per 8 inputs instead of 8 rows k bytes apart (which
 * share cache sets when k is a multiple of 4096); and each row's code sum per group (the
 * unsigned weights' offset correction). Inlined into each kernel's instruction set. */
INLINE void prepare_tiles(const Int4VnniTask *t, int64_t begin, int64_t end) {
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
                int32_t sum = 0;
                for (int64_t i = g * t->group; i < (g + 1) * t->group; i++) sum += a[i];
                t->code_sums[row * groups + g] = sum;
            }
        }
    }
}

/* The tile's rows of the output, columns [col, col + 32), from its float32 group sums: times the
 * row scale, plus the row's compensation, in the output's dtype (bf16 rounded once). */
INLINE void store_rows(const Int4VnniTask *t, const float *sums, int64_t row, int64_t col) {
    for (int r = 0; r < ROWS && row + r < t->m; r++) {
        const int64_t out_row = row + r;
        const float scale = t->row_scales ? t->row_scales[out_row] : 1.0f;
        const int64_t state = t->table && t->states[out_row] ? 1 : 0;
        for (int v = 0; v < VECTORS; v++) {
            const int64_t c = col + 16 * v, at = out_row * t->n + c;
            v16f value;
            memcpy(&value, sums + r * PANEL + 16 * v, sizeof value);
            value *= scale;
            add_and_store16(value, t->table, state * t->n + c, t->out, at, t->bf16);
        }
    }
}

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

/* The first `rows` rows of tile `tile_index` times the output columns [col, col + 32): 2 int32
 * accumulators a row in registers over each weight group. Inlined with a constant `rows`, so the
 * last tile of m = 8q + r rows computes its r rows only (TILE_ROWS). */
VNNI_TARGET INLINE void tile_vnni_rows(const Int4VnniTask *t, int64_t tile_index, int64_t col, const int rows) {
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
            if (0 < rows) ROW_STEP(0);
            if (1 < rows) ROW_STEP(1);
            if (2 < rows) ROW_STEP(2);
            if (3 < rows) ROW_STEP(3);
            if (4 < rows) ROW_STEP(4);
            if (5 < rows) ROW_STEP(5);
            if (6 < rows) ROW_STEP(6);
            if (7 < rows) ROW_STEP(7);
        }
        const __m512 s0 = _mm512_loadu_ps(t->scales + g * t->n + col), s1 = _mm512_loadu_ps(t->scales + g * t->n + col + 16);
        if (0 < rows) ROW_FLUSH(0);
        if (1 < rows) ROW_FLUSH(1);
        if (2 < rows) ROW_FLUSH(2);
        if (3 < rows) ROW_FLUSH(3);
        if (4 < rows) ROW_FLUSH(4);
        if (5 < rows) ROW_FLUSH(5);
        if (6 < rows) ROW_FLUSH(6);
        if (7 < rows) ROW_FLUSH(7);
    }
    store_rows(t, sums, row, col);
}

/* One dot-product step of tile row R into its accumulator c<R> (8 columns): each nibble's pair
 * sums in int16, the two added, widened to four-product int32 sums. */
#define ROW_STEP_AVX2(R)                                                                                \
    do {                                                                                                \
        int32_t first_, second_;                                                                        \
        memcpy(&first_, a + 64 * j + 8 * (R), 4);                                                       \
        memcpy(&second_, a + 64 * j + 8 * (R) + 4, 4);                                                  \
        const __m256i pairs_ = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(first_)),    \
                                                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(second_)));  \
        c##R = _mm256_add_epi32(c##R, _mm256_madd_epi16(pairs_, ones));                                 \
    } while (0)

#define ROW_FLUSH_AVX2(R)                                                                               \
    do {                                                                                                \
        float *into_ = sums + (R) * PANEL + 8 * part;                                                   \
        const __m256i offset_ = _mm256_set1_epi32(8 * code_sums[(R) * groups + g]);                     \
        _mm256_storeu_ps(into_, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c##R, offset_)), s, \
                                                _mm256_loadu_ps(into_)));                               \
    } while (0)

/* The same with AVX2: the panel's 32 columns in four parts of 8 (half of a 16-column block of
 * `packed` each), an int32 accumulator a row in registers over each weight group. */
AVX2_TARGET INLINE void tile_avx2_rows(const Int4VnniTask *t, int64_t tile_index, int64_t col, const int rows) {
    const int64_t k = t->k, steps = t->group / 8, groups = t->k / t->group, row = tile_index * ROWS;
    const int8_t *a = t->tiles + tile_index * k * ROWS;
    const int32_t *code_sums = t->code_sums + row * groups;
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    float sums[ROWS * PANEL] __attribute__((aligned(64))) = {0};
    for (int part = 0; part < PANEL / 8; part++) {
        const uint8_t *w = t->packed + ((col + 8 * part) / 16) * (k / 8) * 64 + (part % 2) * 32;
        for (int64_t g = 0; g < groups; g++) {
            __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
            for (int64_t j = g * steps; j < (g + 1) * steps; j++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(w + j * 64));
                const __m256i lo = _mm256_and_si256(p, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
                if (0 < rows) ROW_STEP_AVX2(0);
                if (1 < rows) ROW_STEP_AVX2(1);
                if (2 < rows) ROW_STEP_AVX2(2);
                if (3 < rows) ROW_STEP_AVX2(3);
                if (4 < rows) ROW_STEP_AVX2(4);
                if (5 < rows) ROW_STEP_AVX2(5);
                if (6 < rows) ROW_STEP_AVX2(6);
                if (7 < rows) ROW_STEP_AVX2(7);
            }
            const __m256 s = _mm256_loadu_ps(t->scales + g * t->n + col + 8 * part);
            if (0 < rows) ROW_FLUSH_AVX2(0);
            if (1 < rows) ROW_FLUSH_AVX2(1);
            if (2 < rows) ROW_FLUSH_AVX2(2);
            if (3 < rows) ROW_FLUSH_AVX2(3);
            if (4 < rows) ROW_FLUSH_AVX2(4);
            if (5 < rows) ROW_FLUSH_AVX2(5);
            if (6 < rows) ROW_FLUSH_AVX2(6);
            if (7 < rows) ROW_FLUSH_AVX2(7);
        }
    }
    store_rows(t, sums, row, col);
}

/* A tile's kernel for its row count (1-8: the last tile of m rows may be partial). */
#define TILE_ROWS(kernel, t, tile_index, col)                                                          \
    do {                                                                                                \
        const int64_t left_ = (t)->m - (tile_index) * ROWS;                                            \
        switch (left_ < ROWS ? left_ : ROWS) {                                                          \
        case 1: kernel(t, tile_index, col, 1); break;                                                   \
        case 2: kernel(t, tile_index, col, 2); break;                                                   \
        case 3: kernel(t, tile_index, col, 3); break;                                                   \
        case 4: kernel(t, tile_index, col, 4); break;                                                   \
        case 5: kernel(t, tile_index, col, 5); break;                                                   \
        case 6: kernel(t, tile_index, col, 6); break;                                                   \
        case 7: kernel(t, tile_index, col, 7); break;                                                   \
        default: kernel(t, tile_index, col, 8);                                                         \
        }                                                                                               \
    } while (0)

VNNI_TARGET static void tile_vnni(const Int4VnniTask *t, int64_t tile_index, int64_t col) {
    TILE_ROWS(tile_vnni_rows, t, tile_index, col);
}
AVX2_TARGET static void tile_avx2(const Int4VnniTask *t, int64_t tile_index, int64_t col) {
    TILE_ROWS(tile_avx2_rows, t, tile_index, col);
}

VNNI_TARGET static void prepare_vnni(const Int4VnniTask *t, int64_t begin, int64_t end) { prepare_tiles(t, begin, end); }
AVX2_TARGET static void prepare_avx2(const Int4VnniTask *t, int64_t begin, int64_t end) { prepare_tiles(t, begin, end); }

int int4_vnni_mm(const Int4VnniTask *task, int threads, int kernel) {
    if (!(int4_mm_kernels() & kernel) || task->n % PANEL || task->group % 8 || task->k % task->group) return 1;
    void (*prepare)(const Int4VnniTask *, int64_t, int64_t) = kernel == INT4_AVX512_VNNI ? prepare_vnni : prepare_avx2;
    void (*tile)(const Int4VnniTask *, int64_t, int64_t) = kernel == INT4_AVX512_VNNI ? tile_vnni : tile_avx2;
    const int64_t panels = task->n / PANEL, tiles = (task->m + ROWS - 1) / ROWS;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        prepare(task, tiles * t / count, tiles * (t + 1) / count);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++)
            for (int64_t tile_index = 0; tile_index < tiles; tile_index++) tile(task, tile_index, p * PANEL);
    }
    return 0;
}

#else

int int4_vnni_mm(const Int4VnniTask *task, int threads, int kernel) {
    (void)task, (void)threads, (void)kernel;
    return 1;
}

#endif
