/* The small per-layer ops of a Llama layer on the CPU, float32, each one pass over its rows:
 *
 *   rms_norm(x, w)    out = w * (x * 1/sqrt(mean(x^2) + eps))      x, out [rows, dim]
 *   silu_mul(gu)      out = silu(gu[:, :n]) * gu[:, n:]             gu [rows, 2n], out [rows, n]
 *   rope(x, c, s)     out = x * c + roll(x, dim/2) * s per head     x, out [rows, heads, dim]; c, s [rows, dim]
 *                     (x's rows may be strided: it is usually a view of the fused qkv projection)
 *
 * torch runs each of these as 3 to 8 kernels (RMSNorm: pow, mean, add, rsqrt, mul, mul; SiLU-and-mul
 * over two strided halves: silu, mul), every one a pass over memory and a dispatch; at the row
 * counts of a decode batch or a prefix hit (16-32 rows of 576) the dispatches cost more than the
 * arithmetic. Rows are split over the calling thread's OpenMP team (torch's libgomp, loaded once)
 * only when there are enough of them to pay for the team's wake-up.
 *
 * Numerics: rope and the multiplications are the same float32 operations in the same order as
 * torch's (this file is built with -ffp-contract=off: no fused multiply-adds), so rope is
 * bit-identical to HF's rotate-half. rms_norm's mean and silu's exp may differ from torch's in
 * the last bit (their summation order and exp polynomial are not torch's).
 *
 * The Python wrapper (cpu_ops.py) checks shapes, dtypes and contiguity; these functions trust the
 * pointers they are handed.
 *
 * Also here, as it concerns the same OpenMP team: pin_team, which binds each thread of the calling
 * thread's team to a core of its own (see py_pin_team).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <sched.h> /* sched_setaffinity, CPU_SET: Python.h defined _GNU_SOURCE */
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PARALLEL_ROWS 64 /* fewer rows run on the calling thread alone */

#include "simd.h"
#include "kernel_api.h"

#ifdef X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

static void rms_norm_rows(const float *x, const float *w, float *out, long rows, int dim, float eps) {
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *o = out + r * dim;
        v8f acc[4] = {splat(0), splat(0), splat(0), splat(0)};
        int i = 0;
        for (; i + 32 <= dim; i += 32)
            for (int a = 0; a < 4; a++) {
                v8f v = load8(xr + i + 8 * a);
                acc[a] += v * v;
            }
        for (; i + 8 <= dim; i += 8) {
            v8f v = load8(xr + i);
            acc[0] += v * v;
        }
        v8f s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        float sum = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
        for (; i < dim; i++) sum += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(sum / (float)dim + eps);
        v8f vi = splat(inv);
        int j = 0;
        for (; j + 8 <= dim; j += 8) store8(o + j, load8(w + j) * (load8(xr + j) * vi));
        for (; j < dim; j++) o[j] = w[j] * (xr[j] * inv);
    }
}

static inline float silu1(float g) {
    float e = expf(-fabsf(g));
    return g >= 0 ? g / (1.0f + e) : g * e / (1.0f + e);
}

/* silu(gate) * up, element by element: the work items are pieces of SILU_PIECE elements of a row, so
 * that the few rows of a prefix hit's step (16 rows of 1536) are split over the threads too (their
 * exponentials took 0.5 ms a step on one thread, the other waiting); a step of fewer than
 * SILU_PARALLEL elements runs on the calling thread. */
#define SILU_PIECE 512
#define SILU_PARALLEL 16384
static void silu_mul_rows(const float *gu, float *out, long rows, int n) {
    const long pieces = (n + SILU_PIECE - 1) / SILU_PIECE;
#pragma omp parallel for schedule(static) if (rows * n >= SILU_PARALLEL)
    for (long item = 0; item < rows * pieces; item++) {
        const long r = item / pieces;
        const int from = (int)(item % pieces) * SILU_PIECE, to = from + SILU_PIECE < n ? from + SILU_PIECE : n;
        const float *g = gu + r * 2L * n, *u = g + n;
        float *o = out + r * n;
        int j = from;
        for (; j + 8 <= to; j += 8) {
            /* silu(g) = g / (1 + e^-g), from e = e^-|g| <= 1 (no overflow): g / (1 + e) for g >= 0,
             * g * e / (1 + e) below */
            v8f gv = load8(g + j);
            v8i neg = gv < splat(0.0f);
            v8f e = exp_nonpositive((v8f)((v8i)gv | (v8i)splat(-0.0f))); /* e^-|g| */
            v8f num = (v8f)(((v8i)(gv * e) & neg) | ((v8i)gv & ~neg));
            store8(o + j, (num / (splat(1.0f) + e)) * load8(u + j));
        }
        for (; j < to; j++) o[j] = silu1(g[j]) * u[j];
    }
}

static void rope_rows(const float *x, long x_stride, const float *c, const float *s, float *out, long rows,
                      int heads, int dim) {
    const int half = dim / 2;
#pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (long r = 0; r < rows; r++) {
        const float *cr = c + r * dim, *sr = s + r * dim;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + r * x_stride + (long)h * dim;
            float *o = out + (r * heads + h) * dim;
            /* roll by half: position j reads x[(j + half) % dim] */
            int j = 0;
            if (half % 8 == 0) {
                for (; j < dim; j += 8) {
                    int k = j < half ? j + half : j - half;
                    store8(o + j, load8(xh + j) * load8(cr + j) + load8(xh + k) * load8(sr + j));
                }
            }
            for (; j < dim; j++) {
                int k = j < half ? j + half : j - half;
                o[j] = xh[j] * cr[j] + xh[k] * sr[j];
            }
        }
    }
}

#ifdef X86
#pragma GCC pop_options
#endif

#define PTR(v) ((float *)(uintptr_t)(v))

/* rms_norm(x, w, out: data pointers as ints, rows, dim, eps) */
static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, w, out;
    long rows;
    int dim;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKlif", &x, &w, &out, &rows, &dim, &eps)) return NULL;
    if (rows < 0 || dim <= 0) {
        PyErr_Format(PyExc_ValueError, "rms_norm: bad sizes: rows %ld, dim %d", rows, dim);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm_rows(PTR(x), PTR(w), PTR(out), rows, dim, eps);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* silu_mul(gate_up, out: data pointers as ints, rows, n) */
static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    unsigned long long gu, out;
    long rows;
    int n;
    if (!PyArg_ParseTuple(args, "KKli", &gu, &out, &rows, &n)) return NULL;
    if (rows < 0 || n <= 0) {
        PyErr_Format(PyExc_ValueError, "silu_mul: bad sizes: rows %ld, n %d", rows, n);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    silu_mul_rows(PTR(gu), PTR(out), rows, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* rope(x, cos, signed_sin, out: data pointers as ints, rows, x's row stride in floats, heads, dim) */
static PyObject *py_rope(PyObject *self, PyObject *args) {
    unsigned long long x, c, s, out;
    long rows, x_stride;
    int heads, dim;
    if (!PyArg_ParseTuple(args, "KKKKllii", &x, &c, &s, &out, &rows, &x_stride, &heads, &dim)) return NULL;
    if (rows < 0 || heads <= 0 || dim <= 0 || dim % 2 || x_stride < (long)heads * dim) {
        PyErr_Format(PyExc_ValueError, "rope: bad sizes: rows %ld, row stride %ld, heads %d, dim %d (even)", rows,
                     x_stride, heads, dim);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rope_rows(PTR(x), x_stride, PTR(c), PTR(s), PTR(out), rows, heads, dim);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* pin_team(cpus): runs one parallel region of the calling thread's team (its size: this thread's
 * omp_get_max_threads, what torch.set_num_threads set) in which thread i binds itself to core
 * cpus[i % len(cpus)]; returns the threads' ids (gettid), in thread-number order. libgomp keeps a
 * master thread's team threads for its later regions, so every kernel and torch op that this thread
 * runs afterwards (at most that many threads) runs on the same threads, on the same cores.
 * Why: two threads of a team that the scheduler lays on one core, while another sits idle, take
 * turns there at each barrier, and, each having just run, neither is moved for milliseconds: a
 * ~1 ms interruption of one of them (another process woken on its core) became 15 ms of turns. */
static PyObject *py_pin_team(PyObject *self, PyObject *args) {
    PyObject *arg;
    if (!PyArg_ParseTuple(args, "O", &arg)) return NULL;
    PyObject *seq = PySequence_Fast(arg, "pin_team: cpus must be a sequence of core numbers");
    if (seq == NULL) return NULL;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > CPU_SETSIZE) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "pin_team: %zd cores given; 1 to %d expected", n, CPU_SETSIZE);
    }
    int cpus[n];
    for (Py_ssize_t i = 0; i < n; i++) {
        const long c = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (c == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        if (c < 0 || c >= CPU_SETSIZE) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "pin_team: core %ld is not a core number (0 to %d)", c, CPU_SETSIZE - 1);
        }
        cpus[i] = (int)c;
    }
    Py_DECREF(seq);
    const int most = omp_get_max_threads();
    long tids[most];
    int errs[most], team = 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
    {
        const int i = omp_get_thread_num();
        if (i == 0) team = omp_get_num_threads();
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpus[i % n], &set);
        errs[i] = sched_setaffinity(0, sizeof set, &set) ? errno : 0;
        tids[i] = (long)syscall(SYS_gettid);
    }
    Py_END_ALLOW_THREADS
    for (int i = 0; i < team; i++)
        if (errs[i])
            return PyErr_Format(PyExc_OSError, "pin_team: thread %d of %d could not be bound to core %d: %s", i, team,
                                cpus[i % n], strerror(errs[i]));
    PyObject *out = PyList_New(team);
    for (int i = 0; out != NULL && i < team; i++) {
        PyObject *tid = PyLong_FromLong(tids[i]);
        if (tid == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, tid);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of float32 rows (see cpu_ops.py, which checks the tensors)."},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu(gate) * up of float32 rows (see cpu_ops.py)."},
    {"rope", py_rope, METH_VARARGS, "Rotate-half RoPE of float32 rows of heads (see cpu_ops.py)."},
    {"pin_team", py_pin_team, METH_VARARGS, "Binds each thread of the calling thread's OpenMP team to a core (see cpu_ops.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_ops", NULL, -1, methods};

static OpsApi api = {rms_norm_rows, silu_mul_rows, rope_rows};

PyMODINIT_FUNC PyInit__cpu_ops(void) {
    PyObject *mod = simd_module_create(&module);
    if (mod != NULL && add_api_capsule(mod, &api, OPS_API_NAME) < 0) Py_CLEAR(mod);
    return mod;
}
