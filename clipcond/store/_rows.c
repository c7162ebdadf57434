/* clipcond._rows: copy rows into a batch and checksum them in the same pass.
 *
 * A store row's checksum is the sum, mod 2^64, of its bytes read as little-endian 64-bit words (a short
 * tail zero-padded; see clipcond/store/checksums.py). Summing after copying is a second pass over
 * each 318 kB SDXL row; here every word is added while it is in a register on its way to the batch, so
 * the check costs about nothing next to the copy. The same loop without the sum is the unchecked read's
 * copy (``sums`` None), so that checked and unchecked reads differ by the additions only. A large batch is
 * copied on several threads: one per BYTES_PER_THREAD of rows (the caller's figure), at most the caller's
 * thread count, since a thread costs ~20 us to start and a 64-core host must not start 31 for 5 MB.
 * ``row_checksum`` checks one row in place (``store[i]``) with no numpy temporaries. ``populate`` maps a fresh
 * batch buffer's pages in one call, before the copy would fault them in one by one. Little-endian machines only
 * (the Python side falls back to numpy).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#define MAX_THREADS 64

typedef uint64_t words4 __attribute__((vector_size(32))); /* four 64-bit words: one AVX2 register, two SSE2 */

#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__clang__) || __GNUC__ >= 6) /* ifunc: glibc */
#define WIDEST_VECTORS __attribute__((target_clones("avx2", "default"))) /* AVX2 where the CPU has it */
#else
#define WIDEST_VECTORS
#endif

/* Copy n bytes from src to dst (unless dst is NULL); with SUM, return the sum of src's little-endian 64-bit
 * words (a short tail zero-padded), else 0. One body for the three uses, so that they differ by the sum only. */
#define COPY_SUM_BODY(COPY, SUM)                                                                                    \
    words4 a0 = {0}, a1 = {0}; /* two chains: an add never waits for the one before */                             \
    size_t i = 0;                                                                                                   \
    for (; i + 64 <= n; i += 64) {                                                                                  \
        words4 x0, x1;                                                                                              \
        memcpy(&x0, src + i, 32); /* memcpy: unaligned loads and stores, no aliasing assumptions */                 \
        memcpy(&x1, src + i + 32, 32);                                                                              \
        if (COPY) {                                                                                                 \
            memcpy(dst + i, &x0, 32);                                                                               \
            memcpy(dst + i + 32, &x1, 32);                                                                          \
        }                                                                                                           \
        if (SUM) {                                                                                                  \
            a0 += x0;                                                                                               \
            a1 += x1;                                                                                               \
        }                                                                                                           \
    }                                                                                                               \
    words4 a = a0 + a1;                                                                                             \
    uint64_t sum = a[0] + a[1] + a[2] + a[3];                                                                       \
    for (; i < n; i += 8) {                                                                                         \
        uint64_t word = 0; /* the tail's last word is zero-padded */                                                \
        size_t k = n - i < 8 ? n - i : 8;                                                                           \
        memcpy(&word, src + i, k);                                                                                  \
        if (COPY)                                                                                                   \
            memcpy(dst + i, &word, k);                                                                              \
        sum += word;                                                                                                \
    }                                                                                                               \
    return SUM ? sum : 0;

WIDEST_VECTORS static uint64_t copy_sum(char *dst, const char *src, size_t n) { COPY_SUM_BODY(1, 1) }
WIDEST_VECTORS static uint64_t copy_only(char *dst, const char *src, size_t n) { COPY_SUM_BODY(1, 0) }
WIDEST_VECTORS static uint64_t sum_only(const char *src, size_t n) {
    char *dst = NULL;
    (void)dst;
    COPY_SUM_BODY(0, 1)
}

/* The pairs of one call. Threads take the next pair until none is left, in order, so a thread that
 * starts late or runs on a busy core does less. The calling thread waits for the pairs to be done, not
 * for the helper threads: one that only starts after the last pair was taken finds nothing to do, and
 * the last thread to leave frees the work (a late helper touches nothing else of the call's). */
struct work {
    Py_buffer *sources, *destinations;
    uint64_t *sums; /* NULL: copy only */
    Py_ssize_t n, next, done; /* pairs, the next one to take, those copied */
    int users;                /* threads that may still touch the work */
    pthread_mutex_t lock;
    pthread_cond_t all_done;
};

static void copy_pairs(struct work *w) {
    Py_ssize_t i;
    while ((i = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED)) < w->n) {
        if (w->sums != NULL)
            w->sums[i] = copy_sum(w->destinations[i].buf, w->sources[i].buf, (size_t)w->sources[i].len);
        else
            copy_only(w->destinations[i].buf, w->sources[i].buf, (size_t)w->sources[i].len);
        pthread_mutex_lock(&w->lock); /* also publishes the copy and its sum to the waiting thread */
        if (++w->done == w->n)
            pthread_cond_signal(&w->all_done);
        pthread_mutex_unlock(&w->lock);
    }
}

static void leave(struct work *w) {
    pthread_mutex_lock(&w->lock);
    int last = --w->users == 0;
    pthread_mutex_unlock(&w->lock);
    if (last) {
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->all_done);
        free(w);
    }
}

static void *helper(void *arg) {
    copy_pairs(arg);
    leave(arg);
    return NULL;
}

/* Copy on this thread and up to threads - 1 detached helpers; 0, or -1 without memory. */
static int run_threads(Py_buffer *sources, Py_buffer *destinations, uint64_t *sums, Py_ssize_t n, int threads) {
    struct work *w = malloc(sizeof(struct work));
    if (w == NULL)
        return -1;
    *w = (struct work){sources, destinations, sums, n, 0, 0, 1};
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->all_done, NULL);
    pthread_attr_t detached;
    pthread_attr_init(&detached);
    pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
    for (int t = 1; t < threads; t++) {
        pthread_t id;
        pthread_mutex_lock(&w->lock);
        w->users++;
        pthread_mutex_unlock(&w->lock);
        if (pthread_create(&id, &detached, helper, w) != 0) {
            leave(w); /* not the last: this thread is a user */
            break;
        }
    }
    pthread_attr_destroy(&detached);
    copy_pairs(w);
    pthread_mutex_lock(&w->lock);
    while (w->done < w->n)
        pthread_cond_wait(&w->all_done, &w->lock);
    pthread_mutex_unlock(&w->lock);
    leave(w);
    return 0;
}

#define DEFAULT_BYTES_PER_THREAD (1 << 20)

PyDoc_STRVAR(copy_rows_doc,
"copy_rows(sources, destinations, sums, threads, bytes_per_thread=1 << 20)\n--\n\n"
"Copy each contiguous buffer of ``sources`` into the writable buffer of ``destinations`` at the same\n"
"position (same sizes), and write each source's sum of little-endian 64-bit words (mod 2^64, a short\n"
"tail zero-padded) into ``sums`` (a writable buffer of len(sources) uint64), or with ``sums`` None only\n"
"copy, through the same loop. One thread per ``bytes_per_thread`` bytes of sources (at least one), at most\n"
"``threads``, take the pairs in order, each the next one left; the GIL is released meanwhile.");

static PyObject *copy_rows(PyObject *module, PyObject *args) {
    PyObject *source_list, *destination_list, *sums_arg;
    Py_buffer sums = {0};
    int threads;
    Py_ssize_t bytes_per_thread = DEFAULT_BYTES_PER_THREAD;
    if (!PyArg_ParseTuple(args, "OOOi|n:copy_rows", &source_list, &destination_list, &sums_arg, &threads,
                          &bytes_per_thread))
        return NULL;
    int summing = sums_arg != Py_None;
    if (summing && PyObject_GetBuffer(sums_arg, &sums, PyBUF_WRITABLE) < 0)
        return NULL;
    PyObject *sources = NULL, *destinations = NULL, *result = NULL;
    Py_buffer *src = NULL, *dst = NULL;  /* pair i: src[i] -> dst[i]; src[0:held_src], dst[0:held_dst] held */
    Py_ssize_t n = 0, held_src = 0, held_dst = 0, total = 0;

    sources = PySequence_Fast(source_list, "copy_rows: sources must be a sequence of buffers");
    if (sources == NULL)
        goto done;
    destinations = PySequence_Fast(destination_list, "copy_rows: destinations must be a sequence of buffers");
    if (destinations == NULL)
        goto done;
    n = PySequence_Fast_GET_SIZE(sources);
    if (PySequence_Fast_GET_SIZE(destinations) != n || (summing && sums.len != n * (Py_ssize_t)sizeof(uint64_t))) {
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
        total += src[i].len;
    }

    /* Threads by bytes, not by cores: each must have at least bytes_per_thread to copy. */
    Py_ssize_t by_bytes = bytes_per_thread > 0 ? total / bytes_per_thread : n;
    if (by_bytes < 1)
        by_bytes = 1;
    if (threads > by_bytes)
        threads = (int)by_bytes;
    if (threads > n)
        threads = (int)n;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1)
        threads = 1;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_threads(src, dst, summing ? sums.buf : NULL, n, threads);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done;
    }
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
    if (summing)
        PyBuffer_Release(&sums);
    return result;
}

/* The sum of one contiguous buffer's words, its buffer released again; 0 and an exception on failure. */
static int buffer_sum(PyObject *object, uint64_t *sum) {
    Py_buffer view;
    if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *sum = sum_only(view.buf, (size_t)view.len); /* a single row (<= ~300 kB): not worth releasing the GIL */
    PyBuffer_Release(&view);
    return 0;
}

PyDoc_STRVAR(row_checksum_doc,
"row_checksum(sequence, pooled, mix)\n--\n\n"
"One row's checksum as a shard stores it (a signed 64-bit int): the word sum of ``sequence`` plus ``mix``\n"
"times the word sum of ``pooled``, mod 2^64 (both contiguous buffers: a row's bytes, read in place).");

static PyObject *row_checksum(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "row_checksum takes 3 arguments (sequence, pooled, mix), got %zd", nargs);
        return NULL;
    }
    uint64_t sequence, pooled, mix = PyLong_AsUnsignedLongLongMask(args[2]);
    if (PyErr_Occurred() || buffer_sum(args[0], &sequence) < 0 || buffer_sum(args[1], &pooled) < 0)
        return NULL;
    return PyLong_FromLongLong((long long)(sequence + pooled * mix)); /* two's complement: the stored int64 */
}

PyDoc_STRVAR(populate_doc,
"populate(buffer)\n--\n\n"
"Give every page of the writable, contiguous ``buffer`` its memory now, in one system call (Linux 5.14+:\n"
"``madvise(MADV_POPULATE_WRITE)``), rather than one page fault per 4 kB page as a copy first writes it.\n"
"True if done; False where the kernel cannot (the pages are then faulted in by the first writes, as before).");

static PyObject *populate(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    int done = 0;
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* <linux/mman.h>, Linux 5.14; an older kernel says EINVAL */
#endif
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    if (view.len > 0 && page > 0 && (page & (page - 1)) == 0) {
        uintptr_t start = (uintptr_t)view.buf & ~(page - 1); /* the pages holding the buffer: all in its mapping */
        uintptr_t end = ((uintptr_t)view.buf + (uintptr_t)view.len + page - 1) & ~(page - 1);
        Py_BEGIN_ALLOW_THREADS
        done = madvise((void *)start, end - start, MADV_POPULATE_WRITE) == 0;
        Py_END_ALLOW_THREADS
    }
#endif
    PyBuffer_Release(&view);
    return PyBool_FromLong(done);
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS, copy_rows_doc},
    {"row_checksum", (PyCFunction)(void (*)(void))row_checksum, METH_FASTCALL, row_checksum_doc},
    {"populate", populate, METH_O, populate_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "clipcond._rows", "Copy rows into a batch and checksum them in one pass.", -1, methods,
};

PyMODINIT_FUNC PyInit__rows(void) {
    return PyModule_Create(&module);
}
