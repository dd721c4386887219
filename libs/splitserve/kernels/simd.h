/* What the CPU kernels (cpu_attention.c, cpu_ops.c) share: their module object, and float32 x 8
 * vector helpers in GCC's vector extensions, compiled (on x86) for AVX2 + FMA like the kernels
 * that inline them. Include it after <Python.h>. */
#ifndef SPLITSERVE_SIMD_H
#define SPLITSERVE_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define X86 1
#endif

/* The extension module of `def`, with `supported`: whether this CPU has what the kernels were
 * compiled for (AVX2, FMA and F16C on x86); the Python side falls back to torch where it has not.
 * Compiled for the baseline instruction set: it runs on any CPU. */
static PyObject *simd_module_create(struct PyModuleDef *def) {
    PyObject *mod = PyModule_Create(def);
    if (mod == NULL) return NULL;
#ifdef X86
    __builtin_cpu_init();
    int supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    int supported = 1;
#endif
    if (PyModule_AddIntConstant(mod, "supported", supported) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}

#ifdef X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

static inline float hsum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* exp(x) for x <= 0 (scores minus their running max): 2^n * e^r, |r| <= ln2/2, degree-6 Taylor
 * polynomial (relative error ~1e-7). Inputs below -87 give ~1e-38 instead of underflowing. Written
 * once for any vector width (NAME over float vectors VF, int vectors VI, SPLAT making a VF): every
 * width makes the same operations on each lane, so the same bits lane by lane. */
#define EXP_NONPOSITIVE(NAME, VF, VI, SPLAT)                                                           \
    static inline VF NAME(VF x) {                                                                  \
        const VF lo = SPLAT(-87.0f);                                                               \
        VI below = x < lo;                                                                         \
        x = (VF)(((VI)x & ~below) | ((VI)lo & below));                                             \
        const VF magic = SPLAT(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */      \
        VF t = x * SPLAT(1.44269504088896341f) + magic;                                            \
        VF n = t - magic;                                                                          \
        VI ni = (VI)t - (VI)magic;                                                                 \
        VF r = x - n * SPLAT(0.693359375f) - n * SPLAT(-2.12194440e-4f);                           \
        VF p = SPLAT(1.0f / 720);                                                                  \
        p = p * r + SPLAT(1.0f / 120);                                                             \
        p = p * r + SPLAT(1.0f / 24);                                                              \
        p = p * r + SPLAT(1.0f / 6);                                                               \
        p = p * r + SPLAT(0.5f);                                                                   \
        p = p * r + SPLAT(1.0f);                                                                   \
        p = p * r + SPLAT(1.0f);                                                                   \
        return p * (VF)((ni + 127) << 23);                                                         \
    }
EXP_NONPOSITIVE(exp_nonpositive, v8f, v8i, splat)

#ifdef X86
#pragma GCC pop_options
#endif

#endif /* SPLITSERVE_SIMD_H */
