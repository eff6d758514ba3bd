/* bf16 <-> float32 and 16-lane float32 vectors (GCC vector extensions), shared by the C kernels:
 * one rounding of float32 to bf16, torch's (round to nearest even, NaN -> 0x7fc0). Functions are
 * always inlined, so each takes the instruction set of the kernel that calls it. */
#pragma once
#include <stdint.h>
#include <string.h>

/* The bits of `value` as type T (GNU statement expression). */
#define BITCAST(T, value)                  \
    ({                                     \
        __typeof__(value) from_ = (value); \
        T to_;                             \
        memcpy(&to_, &from_, sizeof to_);  \
        to_;                               \
    })

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

static inline __attribute__((always_inline)) float bf16_to_float(uint16_t value) {
    return BITCAST(float, (uint32_t)value << 16);
}

/* Rounded to the nearest even bf16 as torch rounds (NaN: 0x7fc0). */
static inline __attribute__((always_inline)) uint16_t float_to_bf16(float x) {
    uint32_t bits = BITCAST(uint32_t, x);
    return x != x ? 0x7fc0 : (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

typedef uint16_t v16h __attribute__((vector_size(32)));

/* Non-negative floats order as their bit patterns: |x| and max compare as integers. */
static inline __attribute__((always_inline)) v16i as_int(v16f x) { return BITCAST(v16i, x); }

static inline __attribute__((always_inline)) v16f as_float(v16i bits) { return BITCAST(v16f, bits); }

typedef uint32_t v16u __attribute__((vector_size(64)));

/* 16 bf16 values widened to float32, and float32 rounded to bf16 as float_to_bf16 does. */
static inline __attribute__((always_inline)) v16f widen16(const uint16_t *in) {
    v16h half;
    memcpy(&half, in, sizeof half);
    return as_float(__builtin_convertvector(half, v16i) << 16);
}

static inline __attribute__((always_inline)) void narrow16(v16f x, uint16_t *out) {
    v16u bits = BITCAST(v16u, x);
    v16u rounded = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16, nan = (v16u)(x != x);
    v16h half = __builtin_convertvector((nan & 0x7fc0) | (~nan & rounded), v16h);
    memcpy(out, &half, sizeof half);
}


/* 16 outputs `value` plus, where `table` is not NULL, its 16 values at `table_at`, stored at `out_at`:
 * bf16 (table and out bf16, rounded once) or float32. The C GEMMs' last epilogue step. */
static inline __attribute__((always_inline)) void add_and_store16(v16f value, const void *table, int64_t table_at,
                                                                  void *out, int64_t out_at, int bf16) {
    if (bf16) {
        if (table) value += widen16((const uint16_t *)table + table_at);
        narrow16(value, (uint16_t *)out + out_at);
    } else {
        if (table) {
            v16f add;
            memcpy(&add, (const float *)table + table_at, sizeof add);
            value += add;
        }
        memcpy((float *)out + out_at, &value, sizeof value);
    }
}
