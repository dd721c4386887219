/* The CPU kernels other C code calls: each extension (cpu_ops.c, cpu_attention.c, cpu_quant.c)
 * exports its functions as a table of pointers in a capsule named `<module>._C_API`, and
 * cpu_layers.c imports the tables (PyCapsule_Import). Every extension keeps its own compile flags
 * (cpu_ops.c is built without fused multiply-adds), so a fused decode step runs the very machine
 * code the per-op path runs: the same bits. The functions trust their pointers; their Python
 * entry points (or cpu_layers.c's) check the sizes first. */
#ifndef SPLITSERVE_KERNEL_API_H
#define SPLITSERVE_KERNEL_API_H

#include <stdint.h>

typedef struct {
    void (*rms_norm_rows)(const float *x, const float *w, float *out, long rows, int dim, float eps);
    void (*silu_mul_rows)(const float *gu, float *out, long rows, int n);
    void (*rope_rows)(const float *x, long x_stride, const float *c, const float *s, float *out, long rows,
                      int heads, int dim);
} OpsApi;

/* How a KV cache stores its rows: as float32 or bfloat16, or 8-bit with one float32 scale per token
 * and kv head (kernels/kv_quant.py; the scales [num_blocks][block_size][kv_heads]). */
enum { KV_F32 = 0, KV_BF16 = 1, KV_INT8 = 2, KV_FP8 = 3 };

typedef struct {
    /* k_scales / v_scales: NULL unless kind is KV_INT8 or KV_FP8 */
    void (*decode_all)(const float *q, const char *k_cache, const char *v_cache, int kind, const float *k_scales,
                       const float *v_scales, const int32_t *tables, int max_blocks, const int32_t *seq_lens,
                       int batch, int heads, int kv_heads, int dim, int block_size, float scale, float *out);
    /* m rows of kv_heads * dim floats (row stride src_stride) into their slots of an 8-bit cache,
     * quantized per kv head exactly as kv_quant.quantize does (values and scales) */
    void (*write_rows_8bit)(const float *src, long src_stride, const int64_t *slots, long m, int kv_heads, int dim,
                            int kind, uint8_t *values, float *scales);
} AttentionApi;

typedef struct {
    /* y [m, n] = x [m, k] @ W^T (+ bias); 0, or -1 when out of memory. int8: activations quantized
     * per block of 32 and integer dot products (cpu_quant.c), else exact float arithmetic. */
    int (*linear)(const float *x, const uint8_t *packed, int kind, const float *bias, float *y, long m_rows, long n,
                  long k, int int8);
} QuantApi;

#define OPS_API_NAME "splitserve.kernels._cpu_ops._C_API"
#define ATTENTION_API_NAME "splitserve.kernels._cpu_attention._C_API"
#define QUANT_API_NAME "splitserve.kernels._cpu_quant._C_API"

/* Adds the capsule of `api` to `mod` as `_C_API`; -1 on error (an exception set). */
static inline int add_api_capsule(PyObject *mod, void *api, const char *name) {
    PyObject *capsule = PyCapsule_New(api, name, NULL);
    if (capsule == NULL) return -1;
    if (PyModule_AddObject(mod, "_C_API", capsule) < 0) {
        Py_DECREF(capsule);
        return -1;
    }
    return 0;
}

#endif /* SPLITSERVE_KERNEL_API_H */
