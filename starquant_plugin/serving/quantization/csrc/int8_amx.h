/* The W8A8 and W4A8 GEMMs of int8_amx.c (AMX-INT8 tiles). */
#pragma once
#include <stdint.h>

typedef struct {
    const int8_t *codes;      /* [m, k] */
    const int8_t *packed;     /* int8 weights [n / 32, k / 64, 2, 16, 64], see int8_amx.c; or NULL and: */
    const uint8_t *packed4;   /* int4 weights [n / 32, k / 64, 2, 8, 64] */
    const float *col_scales;  /* [n] (int8 weights), or the int4 weights' group scales [k / group, n] */
    int64_t group;            /* int4 weights: inputs per scale, a multiple of 64 dividing 1,024 */
    const float *row_scales;  /* [m] or NULL */
    const void *table;        /* [2, n] in the output's dtype, or NULL */
    const int64_t *states;    /* [m] when table */
    const float *bias;        /* [n] or NULL */
    void *out;                /* [m, n]: float32, or bf16 when `bf16` */
    int8_t *tiles;            /* scratch [ceil(m / 16), k / 64, 16, 64] */
    int32_t *sums;            /* scratch [threads, ceil(m / 16) * 16, INT8_AMX_PANEL_COLUMNS] (float32 with int4) */
    int8_t *weights;          /* int4 weights: scratch [threads, INT8_AMX_PANEL_COLUMNS * 1024] */
    int64_t m, n, k;
    int bf16;
} Int8AmxTask;

/* Output columns a thread's int32 partial sums hold while it runs a panel over the input width. */
enum { INT8_AMX_PANEL_COLUMNS = 256 };

/* Whether this CPU runs the kernel (AMX-TILE and AMX-INT8, and the OS lets this process use the
 * tiles: asked once here). */
int int8_amx_supported(void);

/* Nonzero when it cannot run: no AMX, n not a multiple of 32 or k of 64, an int4 group that is
 * not a multiple of 64 dividing 1,024 and k. */
int int8_amx_mm(const Int8AmxTask *task, int threads);
