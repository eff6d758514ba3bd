/* W8A8 and W4A8 GEMMs on AMX CPUs (Intel Sapphire Rapids and later): SGAT's int8 activation codes
 * times int8 (or int4) weights on AMX-INT8 tiles (`tdpbssd`: exact int32 sums over the whole input width), then
 * in one pass per output tile the per-row (token) scales, the per-column (channel) weight scales,
 * the bias and SGAT's per-state compensation, rounded once to the output's dtype:
 *
 *   out[r, c] = row_scale[r] * col_scale[c] * sum_k codes[r, k] * w[c, k]  + bias[c] + table[state[r], c]
 *
 * vLLM's own AMX int8 GEMM (`int8_scaled_mm_with_quant`) quantizes a bf16 input itself and has no
 * per-row scales or per-state add: fed SGAT's codes it needs them written as bf16, quantizes them
 * again, and a second pass over its output applies the scales and the compensation. This kernel
 * takes the codes as they are. Built into `_sgat_cpu` (setup.py); `int8_amx_mm` in sgat_cpu.c is
 * its Python entry, `starquant::int8_mm` and `starquant::int4_amx_mm` (ops.py) its ops.
 *
 * Layout of `packed` ([n / 32, k / 64, 2, 16, 64] bytes): for output columns 32 p .. 32 p + 31 and
 * inputs 64 s .. 64 s + 63, two 16 x 64 B tiles (columns 32 p + 16 h + c, h = 0, 1), byte [q, 4 c + i]
 * = w[32 p + 16 h + c, 64 s + 4 q + i] (AMX's B layout: four consecutive inputs of a column side by
 * side). `pack_int8_amx` (ops.py) writes it. The codes are first regrouped tile by tile as
 * [ceil(m / 16), k / 64, 16, 64] (zero rows past m): a tile load then reads 1 KiB in a row, not 16
 * rows k bytes apart (which share cache sets when k is a multiple of 4096).
 *
 * int4 weights (W4A8 / W4A4, `packed4` [n / 32, k / 64, 2, 8, 64]: the same tiles with rows q and
 * q + 8 in the low and high nibbles of one 64-byte row, stored + 8; `pack_int4_amx` in ops.py) are
 * unpacked to int8 tiles once per chunk of the panel (the unpacked chunk, 256 KiB, is reused by
 * every row), and the accumulators leave the tiles once per weight group (64, 128 or 256 inputs):
 * each group's exact int32 sums times its float32 column scales are added up in float32, and the
 * epilogue then applies the row scales, the bias and the compensation:
 *
 *   out[r, c] = row_scale[r] * sum_g scale[g, c] * sum_{k in g} codes[r, k] * w[c, k]  + bias[c] + table[state[r], c]
 *
 * Work: panels of 256 output columns split over OpenMP threads (torch's, as in sgat_cpu.c). A
 * thread runs its panel over chunks of 1,024 inputs (the chunk of the panel's weights, 256 KiB,
 * stays in L2 while all rows pass): tiles of 32 rows x 32 columns, four int32 accumulator tiles
 * fed by two tiles of codes and two of weights per 64 inputs, kept in the thread's scratch
 * between chunks; after the last chunk the epilogue above writes the tile's outputs.
 * Measured (docs/performance.md, Intel Xeon with AMX): with `sgat_quantize` before it, 1.6-1.8x the
 * AMX bf16 linear and 1.04-1.16x vLLM's plain W8A8 linear (its AMX GEMM with its own quantize) at
 * LLaDA-8B's shapes and 512 tokens.
 */
#define _GNU_SOURCE /* syscall() under -std=c11 */
#include "int8_amx.h"
#include "vec16.h"

#include <omp.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_KERNEL 1
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define AMX_KERNEL 0
#endif

enum {
    TILE_ROWS = 16,
    TILE_BYTES = 64,
    TILE = TILE_ROWS * TILE_BYTES,
    PAIR = 32,
    PANEL = INT8_AMX_PANEL_COLUMNS,
    CHUNK_STEPS = 16, /* 1,024 inputs */
};

#if AMX_KERNEL

/* Linux gives a process the AMX tile state only once it asks (torch.cpu._init_amx asks the same). */
enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };

int int8_amx_supported(void) {
    static int supported = -1;
    if (supported < 0) {
        unsigned int eax, ebx, ecx, edx;
        int ok = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 24 & 1) && (edx >> 25 & 1);
        __builtin_cpu_init();
        ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
        supported = ok && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return supported;
}

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles 0-3: int32 accumulators (rows 0-15 / 16-31 x columns 0-15 / 16-31); 4-5: codes; 6-7: weights. */
AMX_TARGET static void configure_tiles(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int i = 0; i < 8; i++) {
        config.rows[i] = TILE_ROWS;
        config.bytes_per_row[i] = TILE_BYTES;
    }
    /* GCC 12 does not see ldtilecfg read the struct and drops the stores above without this. */
    __asm__ __volatile__("" : : "r"(&config) : "memory");
    _tile_loadconfig(&config);
}

AMX_TARGET static void release_tiles(void) { _tile_release(); }

/* Row tiles [begin, end) of the codes, regrouped as [tile, k / 64, 16, 64] with zero rows past m. */
static void prepare_tiles(const Int8AmxTask *t, int64_t begin, int64_t end) {
    const int64_t steps = t->k / TILE_BYTES;
    for (int64_t tile_index = begin; tile_index < end; tile_index++) {
        int8_t *tiles = t->tiles + tile_index * steps * TILE;
        for (int r = 0; r < TILE_ROWS; r++) {
            const int64_t row = tile_index * TILE_ROWS + r;
            for (int64_t s = 0; s < steps; s++) {
                int8_t *into = tiles + s * TILE + r * TILE_BYTES;
                if (row < t->m)
                    memcpy(into, t->codes + row * t->k + s * TILE_BYTES, TILE_BYTES);
                else
                    memset(into, 0, TILE_BYTES);
            }
        }
    }
}

/* Rows [row, row + rows) x columns [col, col + 32) of the output from their int32 sums (row
 * stride PANEL): the epilogue of the header comment, float32, rounded once. */
AMX_TARGET static void store_rows(const Int8AmxTask *t, const int32_t *sums, int64_t row, int rows, int64_t col) {
    for (int r = 0; r < rows && row + r < t->m; r++) {
        const int64_t out_row = row + r;
        const float row_scale = t->row_scales ? t->row_scales[out_row] : 1.0f;
        const int64_t state = t->table && t->states[out_row] ? 1 : 0;
        for (int v = 0; v < PAIR / 16; v++) {
            const int64_t c = col + 16 * v, at = out_row * t->n + c;
            v16f value;
            if (t->packed4) { /* float32 sums, scaled per group already */
                memcpy(&value, sums + r * PANEL + 16 * v, sizeof value);
                value *= row_scale;
            } else {
                v16i sum;
                v16f col_scale;
                memcpy(&sum, sums + r * PANEL + 16 * v, sizeof sum);
                memcpy(&col_scale, t->col_scales + c, sizeof col_scale);
                value = __builtin_convertvector(sum, v16f) * (col_scale * row_scale);
            }
            if (t->bias) {
                v16f bias;
                memcpy(&bias, t->bias + c, sizeof bias);
                value += bias;
            }
            add_and_store16(value, t->table, state * t->n + c, t->out, at, t->bf16);
        }
    }
}

/* Input steps [from, to) (64 inputs each) of a 32 x 32 output tile into accumulator tiles 0-3:
 * codes tiles at a0 + s * TILE (rows 0-15) and a1 + s * TILE (rows 16-31, when `two`), the pair's
 * two weight tiles at b + s * 2 * TILE. */
AMX_TARGET static inline __attribute__((always_inline)) void tile_steps(const int8_t *a0, const int8_t *a1,
                                                                        const int8_t *b, int64_t from, int64_t to,
                                                                        int two) {
    if (two) {
        for (int64_t s = from; s < to; s++) {
            _tile_loadd(6, b + s * 2 * TILE, TILE_BYTES);
            _tile_loadd(7, b + s * 2 * TILE + TILE, TILE_BYTES);
            _tile_loadd(4, a0 + s * TILE, TILE_BYTES);
            _tile_loadd(5, a1 + s * TILE, TILE_BYTES);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    } else {
        for (int64_t s = from; s < to; s++) {
            _tile_loadd(6, b + s * 2 * TILE, TILE_BYTES);
            _tile_loadd(7, b + s * 2 * TILE + TILE, TILE_BYTES);
            _tile_loadd(4, a0 + s * TILE, TILE_BYTES);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
        }
    }
}

/* Output columns [32 * first_pair, 32 * (first_pair + pairs)) for every row; `sums` is the
 * thread's scratch [ceil(m / 16) * 16, PANEL]. */
AMX_TARGET static void run_panel(const Int8AmxTask *t, int64_t first_pair, int64_t pairs, int32_t *sums) {
    const int64_t steps = t->k / TILE_BYTES, row_tiles = (t->m + TILE_ROWS - 1) / TILE_ROWS;
    const int stride = PANEL * (int)sizeof(int32_t);
    for (int64_t s0 = 0; s0 < steps; s0 += CHUNK_STEPS) {
        const int64_t s1 = s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps;
        for (int64_t rt = 0; rt < row_tiles; rt += 2) {
            const int two = rt + 1 < row_tiles;
            const int8_t *a0 = t->tiles + rt * steps * TILE, *a1 = a0 + steps * TILE;
            for (int64_t p = 0; p < pairs; p++) {
                const int8_t *b = t->packed + (first_pair + p) * steps * 2 * TILE;
                int32_t *acc = sums + rt * TILE_ROWS * PANEL + p * PAIR;
                if (s0 == 0) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                } else {
                    _tile_loadd(0, acc, stride);
                    _tile_loadd(1, acc + 16, stride);
                    if (two) {
                        _tile_loadd(2, acc + TILE_ROWS * PANEL, stride);
                        _tile_loadd(3, acc + TILE_ROWS * PANEL + 16, stride);
                    }
                }
                tile_steps(a0, a1, b, s0, s1, two);
                _tile_stored(0, acc, stride);
                _tile_stored(1, acc + 16, stride);
                if (two) {
                    _tile_stored(2, acc + TILE_ROWS * PANEL, stride);
                    _tile_stored(3, acc + TILE_ROWS * PANEL + 16, stride);
                }
                if (s1 == steps) store_rows(t, acc, rt * TILE_ROWS, two ? 2 * TILE_ROWS : TILE_ROWS, (first_pair + p) * PAIR);
            }
        }
    }
}

/* The chunk [s0, s1) of the int4 weights of pairs [first_pair, first_pair + pairs), unpacked to
 * int8 B tiles as `run_panel` reads them: [pair, s - s0, 2, 16, 64] (a pair's stride CHUNK_STEPS). */
AMX_TARGET static void unpack_int4(const Int8AmxTask *t, int64_t first_pair, int64_t pairs, int64_t s0, int64_t s1,
                                   int8_t *weights) {
    const int64_t steps = t->k / TILE_BYTES;
    const __m512i nibble = _mm512_set1_epi8(0x0f), eight = _mm512_set1_epi8(8);
    for (int64_t p = 0; p < pairs; p++)
        for (int64_t s = s0; s < s1; s++)
            for (int h = 0; h < 2; h++) {
                const uint8_t *from = t->packed4 + (((first_pair + p) * steps + s) * 2 + h) * (TILE / 2);
                int8_t *into = weights + ((p * CHUNK_STEPS + s - s0) * 2 + h) * TILE;
                for (int q = 0; q < TILE_ROWS / 2; q++) {
                    const __m512i bytes = _mm512_loadu_si512(from + q * TILE_BYTES);
                    _mm512_storeu_si512(into + q * TILE_BYTES, _mm512_sub_epi8(_mm512_and_si512(bytes, nibble), eight));
                    _mm512_storeu_si512(into + (q + TILE_ROWS / 2) * TILE_BYTES,
                                        _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble), eight));
                }
            }
}

/* rows x 32 int32 group sums (row stride PAIR) times the group's column scales, added to the
 * float32 sums (row stride PANEL), or written there for the first group. */
AMX_TARGET static void scale_group(const int32_t *group_sums, int rows, const float *scales, float *sums, int first) {
    const __m512 s0 = _mm512_loadu_ps(scales), s1 = _mm512_loadu_ps(scales + 16);
    for (int r = 0; r < rows; r++) {
        const __m512 v0 = _mm512_cvtepi32_ps(_mm512_loadu_si512(group_sums + r * PAIR));
        const __m512 v1 = _mm512_cvtepi32_ps(_mm512_loadu_si512(group_sums + r * PAIR + 16));
        float *into = sums + r * PANEL;
        if (first) {
            _mm512_storeu_ps(into, _mm512_mul_ps(v0, s0));
            _mm512_storeu_ps(into + 16, _mm512_mul_ps(v1, s1));
        } else {
            _mm512_storeu_ps(into, _mm512_fmadd_ps(v0, s0, _mm512_loadu_ps(into)));
            _mm512_storeu_ps(into + 16, _mm512_fmadd_ps(v1, s1, _mm512_loadu_ps(into + 16)));
        }
    }
}

/* `run_panel` for int4 weights: each chunk's weights unpacked once into the thread's `weights`,
 * then per weight group the tiles' exact int32 sums leave the tiles, scaled by the group's column
 * scales into float32 sums (`sums`, row stride PANEL). */
AMX_TARGET static void run_panel_int4(const Int8AmxTask *t, int64_t first_pair, int64_t pairs, float *sums,
                                      int8_t *weights) {
    const int64_t steps = t->k / TILE_BYTES, row_tiles = (t->m + TILE_ROWS - 1) / TILE_ROWS;
    const int64_t group_steps = t->group / TILE_BYTES;
    int32_t group_sums[2 * TILE_ROWS * PAIR] __attribute__((aligned(64)));
    const int stride = PAIR * (int)sizeof(int32_t);
    for (int64_t s0 = 0; s0 < steps; s0 += CHUNK_STEPS) {
        const int64_t s1 = s0 + CHUNK_STEPS < steps ? s0 + CHUNK_STEPS : steps;
        unpack_int4(t, first_pair, pairs, s0, s1, weights);
        for (int64_t rt = 0; rt < row_tiles; rt += 2) {
            const int two = rt + 1 < row_tiles, rows = two ? 2 * TILE_ROWS : TILE_ROWS;
            const int8_t *a0 = t->tiles + rt * steps * TILE, *a1 = a0 + steps * TILE;
            for (int64_t p = 0; p < pairs; p++) {
                const int8_t *b = weights + p * CHUNK_STEPS * 2 * TILE; /* step s at (s - s0) */
                float *acc = sums + rt * TILE_ROWS * PANEL + p * PAIR;
                const int64_t col = (first_pair + p) * PAIR;
                for (int64_t g0 = s0; g0 < s1; g0 += group_steps) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    tile_steps(a0 + s0 * TILE, a1 + s0 * TILE, b, g0 - s0, g0 - s0 + group_steps, two);
                    _tile_stored(0, group_sums, stride);
                    _tile_stored(1, group_sums + 16, stride);
                    if (two) {
                        _tile_stored(2, group_sums + TILE_ROWS * PAIR, stride);
                        _tile_stored(3, group_sums + TILE_ROWS * PAIR + 16, stride);
                    }
                    scale_group(group_sums, rows, t->col_scales + (g0 / group_steps) * t->n + col, acc, g0 == 0);
                }
                if (s1 == steps) store_rows(t, (const int32_t *)acc, rt * TILE_ROWS, rows, col);
            }
        }
    }
}

int int8_amx_mm(const Int8AmxTask *task, int threads) {
    if (!int8_amx_supported() || task->n % PAIR || task->k % TILE_BYTES) return 1;
    if (task->packed4 && (task->group <= 0 || task->group % TILE_BYTES || (CHUNK_STEPS * TILE_BYTES) % task->group ||
                          task->k % task->group))
        return 1;
    const int64_t row_tiles = (task->m + TILE_ROWS - 1) / TILE_ROWS, pairs = task->n / PAIR;
    const int64_t panel_pairs = PANEL / PAIR, panels = (pairs + panel_pairs - 1) / panel_pairs;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), count = omp_get_num_threads();
        prepare_tiles(task, row_tiles * t / count, row_tiles * (t + 1) / count);
        configure_tiles();
        int32_t *sums = task->sums + t * row_tiles * TILE_ROWS * PANEL;
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t first = p * panel_pairs;
            const int64_t count_pairs = first + panel_pairs < pairs ? panel_pairs : pairs - first;
            if (task->packed4)
                run_panel_int4(task, first, count_pairs, (float *)sums, task->weights + t * PANEL * CHUNK_STEPS * TILE_BYTES);
            else
                run_panel(task, first, count_pairs, sums);
        }
        release_tiles();
    }
    return 0;
}

#else

int int8_amx_supported(void) { return 0; }

int int8_amx_mm(const Int8AmxTask *task, int threads) {
    (void)task, (void)threads;
    return 1;
}

#endif
