/* CPU kernel of `starquant::sgat_quantize`, built with the package as the extension module
 * `starquant_plugin.serving.quantization._sgat_cpu` (setup.py; optional: without a C compiler
 * the op falls back to its torch implementation with a named warning).
 *
 * `quantize`, per token row, in float32: subtract the token state's shift, rotate each rotation block by
 * the orthonormal Hadamard (fast Walsh-Hadamard butterflies, stages of half-width 1, 2, 4, ...,
 * then times 1/sqrt(block): the same operations in the same order as the Triton kernel), take
 * the row absmax, scale = max(absmax * clip[state], 1e-8) / qmax, codes = round-half-even(v *
 * (1 / scale)) clamped to [-qmax, qmax]. Rows are split over `threads` OpenMP threads (torch's); the GIL is
 * released while they run. Tensors arrive as addresses of contiguous buffers (checked by the
 * Python caller). `add_state_rows` scales a GEMM's output rows and adds SGAT's per-state
 * compensation, in place. Vector code uses GCC's vector extensions, compiled for AVX-512, AVX2 and the
 * baseline and picked at load time (target_clones); where the CPU has AVX-512 F/BW, a row of whole
 * 16-column vectors takes the intrinsics of sgat_avx512.c instead (same codes and scales;
 * 1.6-1.8x faster than GCC's lowering of this code), unless `portable` asks for this code.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "int4_vnni.h"
#include "int8_amx.h"
#include "sgat_avx512.h"
#include "vec16.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

enum { DTYPE_FLOAT32 = 0, DTYPE_BFLOAT16 = 1 };

typedef struct {
    const void *x;
    int dtype;
    const int64_t *states;
    const float *shift; /* [2, width] */
    const float *clip;  /* [2] */
    void *codes; /* [tokens, codes_width]: int8, or bf16 integers */
    int codes_dtype;
    float *scales;
    int64_t width, block, codes_width;
    float qmax;
    int avx512; /* run sgat_avx512.c's row passes where the row allows */
} QuantizeTask;

typedef struct {
    void *out; /* [rows, width], dtype */
    int dtype;
    const float *scales; /* [rows] or NULL */
    const void *table;   /* [2, width], dtype, or NULL */
    const int64_t *states;
    int64_t width;
} AddRowsTask;

MULTIVERSION static void load_row(const void *x, int dtype, int64_t row, int64_t width, const float *shift, float *v) {
    if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *in = (const uint16_t *)x + row * width;
        for (int64_t c = 0; c < width; c++) v[c] = bf16_to_float(in[c]) - shift[c];
    } else {
        const float *in = (const float *)x + row * width;
        for (int64_t c = 0; c < width; c++) v[c] = in[c] - shift[c];
    }
}

/* Walsh-Hadamard butterfly stages of half-width 1, 2, 4, ... over elements b[0..n) of type T
 * (floats, or whole 16-float vectors): (a, c) -> (a + c, a - c). */
#define BUTTERFLIES(T, b, n)                                      \
    _Pragma("GCC unroll 8")                                       \
    for (int64_t half = 1; half < (n); half *= 2)                 \
        _Pragma("GCC unroll 16")                                  \
        for (int64_t i = 0; i < (n); i += 2 * half)               \
            _Pragma("GCC unroll 16")                              \
            for (int64_t j = i; j < i + half; j++) {              \
                T a_ = (b)[j], c_ = (b)[j + half];                \
                (b)[j] = a_ + c_;                                 \
                (b)[j + half] = a_ - c_;                          \
            }

/* Butterfly stages of half-width 1, 2, 4, 8 inside one 16-float vector: lane j takes
 * x[j] + x[j ^ h] (lower lane of the pair) or x[j ^ h] - x[j] (upper), i.e. (a + c, a - c). */
#define STAGE(x, h)                                                                                           \
    do {                                                                                                      \
        const v16i partner = {0 ^ h, 1 ^ h, 2 ^ h, 3 ^ h, 4 ^ h, 5 ^ h, 6 ^ h, 7 ^ h,                        \
                              8 ^ h, 9 ^ h, 10 ^ h, 11 ^ h, 12 ^ h, 13 ^ h, 14 ^ h, 15 ^ h};                 \
        const v16f sign = {(0 & h) ? -1.f : 1.f, (1 & h) ? -1.f : 1.f, (2 & h) ? -1.f : 1.f,                   \
                           (3 & h) ? -1.f : 1.f, (4 & h) ? -1.f : 1.f, (5 & h) ? -1.f : 1.f,                   \
                           (6 & h) ? -1.f : 1.f, (7 & h) ? -1.f : 1.f, (8 & h) ? -1.f : 1.f,                   \
                           (9 & h) ? -1.f : 1.f, (10 & h) ? -1.f : 1.f, (11 & h) ? -1.f : 1.f,                 \
                           (12 & h) ? -1.f : 1.f, (13 & h) ? -1.f : 1.f, (14 & h) ? -1.f : 1.f,                \
                           (15 & h) ? -1.f : 1.f};                                                            \
        x = x * sign + __builtin_shuffle(x, partner);                                                         \
    } while (0)

/* 16 inputs from column c, in float32, minus the shift. */
static inline __attribute__((always_inline)) v16f load16(const void *x, int dtype, int64_t offset, const float *shift) {
    v16f value, minus;
    if (dtype == DTYPE_BFLOAT16) {
        value = widen16((const uint16_t *)x + offset);
    } else {
        memcpy(&value, (const float *)x + offset, sizeof value);
    }
    memcpy(&minus, shift, sizeof minus);
    return value - minus;
}

static inline __attribute__((always_inline)) v16f running_absmax(v16f absmax, v16f x) {
    v16i magnitude = as_int(x) & 0x7fffffff, larger = magnitude > as_int(absmax);
    return as_float((larger & magnitude) | (~larger & as_int(absmax)));
}

/* One rotation block of `vectors` 16-column vectors from x[offset:], into b: each vector takes
 * butterfly stages 1-8 in registers, then stages 16, 32, ... combine whole vectors; inlined with
 * a constant `vectors` for the usual block sizes, so the block stays in registers. */
static inline __attribute__((always_inline)) v16f rotate_block(const void *x, int dtype, int64_t offset,
                                                               const float *shift, v16f *b, const int64_t vectors,
                                                               float norm, v16f absmax) {
    v16f r[64];
    for (int64_t k = 0; k < vectors; k++) {
        v16f value = load16(x, dtype, offset + 16 * k, shift + 16 * k);
        STAGE(value, 1);
        STAGE(value, 2);
        STAGE(value, 4);
        STAGE(value, 8);
        r[k] = value;
    }
    BUTTERFLIES(v16f, r, vectors);
    for (int64_t k = 0; k < vectors; k++) {
        b[k] = r[k] * norm;
        absmax = running_absmax(absmax, b[k]);
    }
    return absmax;
}

/* Widths in whole 16-column vectors, rotation blocks of 16 to 1024 columns (or none). v receives
 * the row in float32, lanes the 16 lanes' running |max|. */
MULTIVERSION static void load_rotate_row(const void *x, int dtype, int64_t row, int64_t width, int64_t block,
                                         const float *shift, v16f *v, v16f *lanes) {
    v16f absmax = {0};
    if (!block) {
        for (int64_t k = 0; k < width / 16; k++) {
            v[k] = load16(x, dtype, row * width + 16 * k, shift + 16 * k);
            absmax = running_absmax(absmax, v[k]);
        }
        *lanes = absmax;
        return;
    }
    const float norm = 1.0f / sqrtf((float)block);
    for (int64_t start = 0; start < width; start += block) {
        const int64_t offset = row * width + start;
        v16f *b = v + start / 16;
        switch (block / 16) {
            case 1: absmax = rotate_block(x, dtype, offset, shift + start, b, 1, norm, absmax); break;
            case 2: absmax = rotate_block(x, dtype, offset, shift + start, b, 2, norm, absmax); break;
            case 4: absmax = rotate_block(x, dtype, offset, shift + start, b, 4, norm, absmax); break;
            case 8: absmax = rotate_block(x, dtype, offset, shift + start, b, 8, norm, absmax); break;
            case 16: absmax = rotate_block(x, dtype, offset, shift + start, b, 16, norm, absmax); break;
            case 32: absmax = rotate_block(x, dtype, offset, shift + start, b, 32, norm, absmax); break;
            default: absmax = rotate_block(x, dtype, offset, shift + start, b, 64, norm, absmax); break; /* 1024 */
        }
    }
    *lanes = absmax;
}

/* Rotation blocks under 16 columns (narrow layers): scalar butterflies. */
static void hadamard_blocks(float *v, int64_t width, int64_t block) {
    const float norm = 1.0f / sqrtf((float)block);
    for (int64_t start = 0; start < width; start += block) {
        float *b = v + start;
        BUTTERFLIES(float, b, block);
        for (int64_t j = 0; j < block; j++) b[j] *= norm;
    }
}

MULTIVERSION static void store_codes(const float *v, int64_t width, float scale, float qmax, int8_t *out) {
    const float inverse = 1.0f / scale;
    const int32_t top = (int32_t)qmax;
    for (int64_t c = 0; c < width; c++) {
        int32_t q = __builtin_irintf(v[c] * inverse); /* the default rounding mode: half to even */
        q = q > top ? top : (q < -top ? -top : q);
        out[c] = (int8_t)q;
    }
}

/* The same codes as bf16 values (integers up to 127: exact). */
MULTIVERSION static void store_codes_bf16(const float *v, int64_t width, float scale, float qmax, uint16_t *out) {
    const float inverse = 1.0f / scale;
    for (int64_t c = 0; c < width; c++) {
        float q = __builtin_rintf(v[c] * inverse);
        q = q > qmax ? qmax : (q < -qmax ? -qmax : q);
        out[c] = (uint16_t)(BITCAST(uint32_t, q) >> 16); /* exact: |q| <= 127 fits bf16's 8 bits */
    }
}

/* The padding columns of bf16 codes, [width, codes_width): a sentinel 127 first, zeros after (for
 * a GEMM that quantizes its input per row: the row's |max| is then 127, its scale 1, and the
 * codes come back unchanged). */
static void store_padding_bf16(int64_t width, int64_t codes_width, uint16_t *out) {
    for (int64_t c = width; c < codes_width; c++) out[c] = c == width ? 0x42fe /* 127 */ : 0;
}

/* A share of rows: returns nonzero when it could not run (out of memory). */
typedef int (*RowsBody)(const void *task, int64_t begin, int64_t end);

/* Rows [0, rows) in `threads` contiguous shares on OpenMP threads; called without the GIL.
 * OpenMP, not threads of our own: under torch (which loads its libgomp.so.1 first) these are
 * torch's own intra-op threads, with the CPU bindings vLLM's worker gave them; a thread created
 * here would inherit the caller's binding to one core and queue behind it. Returns nonzero when
 * memory ran out. */
static int parallel_rows(RowsBody body, const void *task, int64_t rows, int threads) {
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        failed |= body(task, rows * t / n, rows * (t + 1) / n);
    }
    return failed;
}

static int quantize_rows(const void *arg, int64_t begin, int64_t end) {
    const QuantizeTask *task = (const QuantizeTask *)arg;
    float *v = aligned_alloc(64, sizeof(float) * (size_t)((task->width + 15) / 16 * 16));
    if (!v) return 1;
    /* Rows of whole 16-column vectors and blocks of 16-1024 (or none): the vector code paths. */
    const int vectors = task->width % 16 == 0 && ((task->block >= 16 && task->block <= 1024) || !task->block);
    const int avx512 = vectors && task->avx512;
    for (int64_t row = begin; row < end; row++) {
        int64_t state = task->states[row] ? 1 : 0;
        const float *shift = task->shift + state * task->width;
        float absmax = 0.0f;
        if (avx512) {
            absmax = sgat_avx512_load_rotate(task->x, task->dtype == DTYPE_BFLOAT16, row, task->width, task->block, shift, v);
        } else if (vectors) {
            v16f lanes;
            load_rotate_row(task->x, task->dtype, row, task->width, task->block, shift, (v16f *)v, &lanes);
            for (int l = 0; l < 16; l++) absmax = lanes[l] > absmax ? lanes[l] : absmax;
        } else {
            load_row(task->x, task->dtype, row, task->width, shift, v);
            if (task->block) hadamard_blocks(v, task->width, task->block);
            for (int64_t c = 0; c < task->width; c++) absmax = fabsf(v[c]) > absmax ? fabsf(v[c]) : absmax;
        }
        float bound = absmax * task->clip[state];
        float scale = (bound > 1e-8f ? bound : 1e-8f) / task->qmax;
        task->scales[row] = scale;
        if (task->codes_dtype == DTYPE_BFLOAT16) {
            uint16_t *out = (uint16_t *)task->codes + row * task->codes_width;
            if (avx512)
                sgat_avx512_store_codes_bf16(v, task->width, scale, task->qmax, out);
            else
                store_codes_bf16(v, task->width, scale, task->qmax, out);
            store_padding_bf16(task->width, task->codes_width, out);
        } else if (avx512) {
            sgat_avx512_store_codes(v, task->width, scale, task->qmax, (int8_t *)task->codes + row * task->width);
        } else {
            store_codes(v, task->width, scale, task->qmax, (int8_t *)task->codes + row * task->width);
        }
    }
    free(v);
    return 0;
}

/* out = out * scale + add (add may be NULL), in float32, rounded once. */
MULTIVERSION static void scale_add_row_bf16(uint16_t *out, float scale, const uint16_t *add, int64_t width) {
    int64_t c = 0;
    for (; c + 16 <= width; c += 16) {
        v16f value = widen16(out + c) * scale;
        narrow16(add ? value + widen16(add + c) : value, out + c);
    }
    for (; c < width; c++) out[c] = float_to_bf16(bf16_to_float(out[c]) * scale + (add ? bf16_to_float(add[c]) : 0.0f));
}

MULTIVERSION static void scale_add_row_float(float *out, float scale, const float *add, int64_t width) {
    if (add && scale == 1.0f)
        for (int64_t c = 0; c < width; c++) out[c] += add[c];
    else if (add)
        for (int64_t c = 0; c < width; c++) out[c] = out[c] * scale + add[c];
    else
        for (int64_t c = 0; c < width; c++) out[c] *= scale;
}

static int add_rows(const void *arg, int64_t begin, int64_t end) {
    const AddRowsTask *task = (const AddRowsTask *)arg;
    const int64_t size = task->dtype == DTYPE_BFLOAT16 ? 2 : 4;
    for (int64_t row = begin; row < end; row++) {
        const float scale = task->scales ? task->scales[row] : 1.0f;
        const char *add = task->table ? (const char *)task->table + (task->states[row] ? 1 : 0) * task->width * size : NULL;
        char *out = (char *)task->out + row * task->width * size;
        if (task->dtype == DTYPE_BFLOAT16)
            scale_add_row_bf16((uint16_t *)out, scale, (const uint16_t *)add, task->width);
        else
            scale_add_row_float((float *)out, scale, (const float *)add, task->width);
    }
    return 0;
}

static PyObject *quantize(PyObject *self, PyObject *args) {
    unsigned long long x, states, shift, clip, codes, scales;
    int dtype, codes_dtype, threads, portable, failed;
    long long tokens, width, block, codes_width;
    float qmax;
    if (!PyArg_ParseTuple(args, "KiKKKKiLKLLLfip", &x, &dtype, &states, &shift, &clip, &codes, &codes_dtype, &codes_width,
                          &scales, &tokens, &width, &block, &qmax, &threads, &portable))
        return NULL;
    QuantizeTask task = {(const void *)x, dtype, (const int64_t *)states, (const float *)shift, (const float *)clip,
                         (void *)codes, codes_dtype, (float *)scales, width, block, codes_width, qmax,
                         !portable && sgat_avx512_supported()};
    Py_BEGIN_ALLOW_THREADS
    failed = parallel_rows(quantize_rows, &task, tokens, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *add_state_rows(PyObject *self, PyObject *args) {
    unsigned long long out, scales, table, states;
    int dtype, threads, failed;
    long long rows, width;
    if (!PyArg_ParseTuple(args, "KiKKKLLi", &out, &dtype, &scales, &table, &states, &rows, &width, &threads))
        return NULL;
    AddRowsTask task = {(void *)out, dtype, (const float *)scales, (const void *)table, (const int64_t *)states, width};
    Py_BEGIN_ALLOW_THREADS
    failed = parallel_rows(add_rows, &task, rows, threads);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *int4_vnni_mm_entry(PyObject *self, PyObject *args) {
    unsigned long long codes, packed, scales, row_scales, table, states, out, code_sums, tiles;
    long long m, n, k, group;
    int bf16, threads, kernel, failed;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKLLLLiii", &codes, &packed, &scales, &row_scales, &table, &states, &out, &code_sums,
                          &tiles, &m, &n, &k, &group, &bf16, &threads, &kernel))
        return NULL;
    Int4VnniTask task = {(const int8_t *)codes, (const uint8_t *)packed, (const float *)scales, (const float *)row_scales,
                         (const void *)table, (const int64_t *)states, (void *)out, (int32_t *)code_sums, (int8_t *)tiles, m, n, k, group,
                         bf16};
    Py_BEGIN_ALLOW_THREADS
    failed = int4_vnni_mm(&task, threads, kernel);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "int4_vnni_mm: this CPU does not run that kernel, or n is not a multiple of 32, "
                                          "or the group not a multiple of 8 dividing k");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *int8_amx_mm_entry(PyObject *self, PyObject *args) {
    unsigned long long codes, packed, packed4, col_scales, row_scales, table, states, bias, out, tiles, sums, weights;
    long long m, n, k, group;
    int bf16, threads, failed;
    if (!PyArg_ParseTuple(args, "KKKKKKKKKKKKLLLLii", &codes, &packed, &packed4, &col_scales, &row_scales, &table, &states,
                          &bias, &out, &tiles, &sums, &weights, &m, &n, &k, &group, &bf16, &threads))
        return NULL;
    Int8AmxTask task = {(const int8_t *)codes, (const int8_t *)packed, (const uint8_t *)packed4, (const float *)col_scales,
                        group, (const float *)row_scales, (const void *)table, (const int64_t *)states,
                        (const float *)bias, (void *)out, (int8_t *)tiles, (int32_t *)sums, (int8_t *)weights, m, n, k,
                        bf16};
    Py_BEGIN_ALLOW_THREADS
    failed = int8_amx_mm(&task, threads);
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_SetString(PyExc_ValueError, "int8_amx_mm: this CPU has no AMX-INT8 (or the OS refused it), or n is not a "
                                          "multiple of 32, or k of 64, or the int4 group not a multiple of 64 dividing "
                                          "1024 and k");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *int8_amx_supported_entry(PyObject *self, PyObject *args) { return PyBool_FromLong(int8_amx_supported()); }

static PyObject *int4_mm_kernels_entry(PyObject *self, PyObject *args) {
    static const struct {
        const char *name;
        int kernel;
    } order[] = {{"avx512_vnni", INT4_AVX512_VNNI}, {"avx2", INT4_AVX2}};
    const int kernels = int4_mm_kernels();
    PyObject *names = PyDict_New();
    for (size_t i = 0; names && i < sizeof order / sizeof order[0]; i++) {
        if (!(kernels & order[i].kernel)) continue;
        PyObject *value = PyLong_FromLong(order[i].kernel);
        if (!value || PyDict_SetItemString(names, order[i].name, value)) Py_CLEAR(names);
        Py_XDECREF(value);
    }
    return names;
}

static PyMethodDef methods[] = {
    {"quantize", quantize, METH_VARARGS,
     "quantize(x, dtype, states, shift, clip, codes, codes_dtype, codes_width, scales, tokens, width, block, qmax, "
     "threads, portable): addresses of contiguous buffers; writes codes [tokens, codes_width] (int8 with codes_width = width, "
     "or bf16 with a sentinel 127 and zeros in the columns past width) and scales float32 [tokens]; portable: "
     "the portable vector code even where sgat_avx512.c's row passes could run (for tests)."},
    {"add_state_rows", add_state_rows, METH_VARARGS,
     "add_state_rows(out, dtype, scales, table, states, rows, width, threads): out[r] = out[r] * scales[r] + "
     "table[states[r] != 0] in place (scales, table: 0 for none), in float32, rounded once to bf16 as torch rounds."},
    {"int4_vnni_mm", int4_vnni_mm_entry, METH_VARARGS,
     "int4_vnni_mm(codes, packed, scales, row_scales, table, states, out, code_sums, tiles, m, n, k, group, bf16, "
     "threads, kernel): "
     "the W4A8 GEMM of int4_vnni.c on addresses of contiguous buffers (row_scales, table: 0 for none) with `kernel`, "
     "a value of int4_mm_kernels()."},
    {"int8_amx_mm", int8_amx_mm_entry, METH_VARARGS,
     "int8_amx_mm(codes, packed, packed4, col_scales, row_scales, table, states, bias, out, tiles, sums, weights, m, n, k, "
     "group, bf16, threads): the W8A8 (packed) or W4A8 (packed4, group scales in col_scales) GEMM of int8_amx.c on "
     "addresses of contiguous buffers (packed or packed4, row_scales, table, bias: 0 for none)."},
    {"int8_amx_supported", int8_amx_supported_entry, METH_NOARGS,
     "Whether this CPU runs int8_amx_mm (AMX-TILE and AMX-INT8, tile state granted by the OS)."},
    {"int4_mm_kernels", int4_mm_kernels_entry, METH_NOARGS,
     "The int4_vnni_mm kernels this CPU runs, fastest first: {name: kernel}, names avx512_vnni and avx2."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sgat_cpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__sgat_cpu(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "INT8_AMX_PANEL_COLUMNS", INT8_AMX_PANEL_COLUMNS)) Py_CLEAR(m);
    return m;
}
