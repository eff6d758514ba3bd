/* The W4A8 GEMM of int4_vnni.c (AVX512-VNNI and AVX2 kernels). */
#pragma once
#include <stdint.h>

typedef struct {
    const int8_t *codes;      /* [m, k] */
    const uint8_t *packed;    /* [n / 16, k / 8, 16, 4], see int4_vnni.c */
    const float *scales;      /* [k / group, n] */
    const float *row_scales;  /* [m] or NULL */
    const void *table;        /* [2, n] in the output's dtype, or NULL */
    const int64_t *states;    /* [m] when table */
    void *out;                /* [m, n]: float32, or bf16 when `bf16` */
    int32_t *code_sums;       /* scratch [ceil(m / 8) * 8, k / group] */
    int8_t *tiles;            /* scratch [ceil(m / 8) * 8, k] */
    int64_t m, n, k, group;
    int bf16;
} Int4VnniTask;

enum { INT4_AVX2 = 1, INT4_AVX512_VNNI = 2 };

/* The kernels this CPU runs, a mask of the above (AVX2 with FMA; AVX-512 F/BW/VL with VNNI). */
int int4_mm_kernels(void);

/* Nonzero when it cannot run: `kernel` not run by this CPU, n not a multiple of 32, group not a
 * multiple of 8 dividing k. */
int int4_vnni_mm(const Int4VnniTask *task, int threads, int kernel);
