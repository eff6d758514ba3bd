/* The W8A8 GEMM of int8_amx.c (AMX-INT8 tiles). */
#pragma once
#include <stdint.h>

typedef struct {
    const int8_t *codes;      /* [m, k] */
    const int8_t *packed;     /* [n / 32, k / 64, 2, 16, 64], see int8_amx.c */
    const float *col_scales;  /* [n] */
    const float *row_scales;  /* [m] or NULL */
    const void *table;        /* [2, n] in the output's dtype, or NULL */
    const int64_t *states;    /* [m] when table */
    const float *bias;        /* [n] or NULL */
    void *out;                /* [m, n]: float32, or bf16 when `bf16` */
    int8_t *tiles;            /* scratch [ceil(m / 16), k / 64, 16, 64] */
    int32_t *sums;            /* scratch [threads, ceil(m / 16) * 16, INT8_AMX_PANEL_COLUMNS] */
    int64_t m, n, k;
    int bf16;
} Int8AmxTask;

/* Output columns a thread's int32 partial sums hold while it runs a panel over the input width. */
enum { INT8_AMX_PANEL_COLUMNS = 256 };

/* Whether this CPU runs the kernel (AMX-TILE and AMX-INT8, and the OS lets this process use the
 * tiles: asked once here). */
int int8_amx_supported(void);

/* Nonzero when it cannot run: no AMX, n not a multiple of 32 or k of 64. */
int int8_amx_mm(const Int8AmxTask *task, int threads);
