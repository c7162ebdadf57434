/* clipcond._rows: copy rows into a batch and checksum them in the same pass.
 *
 * A store row's checksum is the sum, mod 2^64, of its bytes read as little-endian 64-bit words (a short
 * tail zero-padded; see clipcond/store.py, row_checksums). Summing after copying is a second pass over
 * each 318 kB SDXL row; here every word is added while it is in a register on its way to the batch, so
 * the check costs about nothing next to the copy. A large batch is copied on several threads, as torch
 * copies a large tensor. Little-endian machines only (the Python side falls back to numpy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64

typedef uint64_t words4 __attribute__((vector_size(32))); /* four 64-bit words: one AVX2 register, two SSE2 */

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 6)
#define WIDEST_VECTORS __attribute__((target_clones("avx2", "default"))) /* AVX2 where the CPU has it */
#else
#define WIDEST_VECTORS
#endif

/* Copy n bytes from src to dst; return the sum of src's little-endian 64-bit words. */
WIDEST_VECTORS static uint64_t copy_sum(char *dst, const char *src, size_t n) {
    words4 a0 = {0}, a1 = {0}; /* two chains: an add never waits for the one before */
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        words4 x0, x1;
        memcpy(&x0, src + i, 32); /* memcpy: unaligned loads and stores, no aliasing assumptions */
        memcpy(&x1, src + i + 32, 32);
        memcpy(dst + i, &x0, 32);
        memcpy(dst + i + 32, &x1, 32);
        a0 += x0;
        a1 += x1;
    }
    words4 a = a0 + a1;
    uint64_t sum = a[0] + a[1] + a[2] + a[3];
    for (; i < n; i += 8) {
        uint64_t word = 0; /* the tail's last word is zero-padded */
        size_t k = n - i < 8 ? n - i : 8;
        memcpy(&word, src + i, k);
        memcpy(dst + i, &word, k);
        sum += word;
    }
    return sum;
}

/* The pairs of one call; threads take the next pair until none is left, so a thread that starts late or
 * runs on a busy core does less (a fixed split would wait for it), and pairs are taken in order. */
struct work {
    Py_buffer *sources, *destinations;
    uint64_t *sums;
    Py_ssize_t n, next;
};

static void *copy_pairs(void *arg) {
    struct work *w = arg;
    Py_ssize_t i;
    while ((i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED)) < w->n)
        w->sums[i] = copy_sum(w->destinations[i].buf, w->sources[i].buf, (size_t)w->sources[i].len);
    return NULL;
}

/* Copy on this thread and threads - 1 more; pthread_join makes their copies and sums visible here. */
static void run_threads(struct work *w, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    while (started < threads - 1 && pthread_create(&ids[started], NULL, copy_pairs, w) == 0)
        started++;
    copy_pairs(w);
    for (int t = 0; t < started; t++)
        pthread_join(ids[t], NULL);
}

PyDoc_STRVAR(copy_rows_doc,
"copy_rows(sources, destinations, sums, threads)\n--\n\n"
"Copy each contiguous buffer of ``sources`` into the writable buffer of ``destinations`` at the same\n"
"position (same sizes), and write each source's sum of little-endian 64-bit words (mod 2^64, a short\n"
"tail zero-padded) into ``sums`` (a writable buffer of len(sources) uint64). Up to ``threads`` threads\n"
"take the pairs in order, each the next one left; the GIL is released meanwhile.");

static PyObject *copy_rows(PyObject *module, PyObject *args) {
    PyObject *source_list, *destination_list;
    Py_buffer sums;
    int threads;
    if (!PyArg_ParseTuple(args, "OOw*i:copy_rows", &source_list, &destination_list, &sums, &threads))
        return NULL;
    PyObject *sources = NULL, *destinations = NULL, *result = NULL;
    Py_buffer *src = NULL, *dst = NULL;  /* pair i: src[i] -> dst[i]; src[0:held_src], dst[0:held_dst] held */
    Py_ssize_t n = 0, held_src = 0, held_dst = 0;

    sources = PySequence_Fast(source_list, "copy_rows: sources must be a sequence of buffers");
    destinations = PySequence_Fast(destination_list, "copy_rows: destinations must be a sequence of buffers");
    if (sources == NULL || destinations == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(sources);
    if (PySequence_Fast_GET_SIZE(destinations) != n || sums.len != n * (Py_ssize_t)sizeof(uint64_t)) {
        PyErr_Format(PyExc_ValueError, "copy_rows: %zd sources, %zd destinations and %zd bytes of sums "
                     "(want one destination and 8 bytes of sums per source)",
                     n, PySequence_Fast_GET_SIZE(destinations), sums.len);
        goto done;
    }
    src = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    dst = PyMem_Calloc((size_t)n + 1, sizeof(Py_buffer));
    if (src == NULL || dst == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(sources, i), &src[i], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        held_src++;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(destinations, i), &dst[i],
                               PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto done;
        held_dst++;
        if (src[i].len != dst[i].len) {
            PyErr_Format(PyExc_ValueError, "copy_rows: source %zd has %zd bytes, its destination %zd",
                         i, src[i].len, dst[i].len);
            goto done;
        }
    }

    if (threads > n)
        threads = (int)n;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    struct work work = {src, dst, sums.buf, n, 0};
    Py_BEGIN_ALLOW_THREADS
    run_threads(&work, threads);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);

done:
    for (Py_ssize_t i = 0; i < held_src; i++)
        PyBuffer_Release(&src[i]);
    for (Py_ssize_t i = 0; i < held_dst; i++)
        PyBuffer_Release(&dst[i]);
    PyMem_Free(src);
    PyMem_Free(dst);
    Py_XDECREF(sources);
    Py_XDECREF(destinations);
    PyBuffer_Release(&sums);
    return result;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS, copy_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "clipcond._rows", "Copy rows into a batch and checksum them in one pass.", -1, methods,
};

PyMODINIT_FUNC PyInit__rows(void) {
    return PyModule_Create(&module);
}
