/* The compiled core of BPETokenizer, in C: the merge loop of one pre-token, and the loop over a
   text's pre-tokens with the per-piece cache (the two loops of a cold encode after the regex).

   The merge runs exactly the algorithm of BPETokenizer._bpe_python (the readable reference,
   which tests/test_tokenizer_equivalence.py compares it with): start from the piece's UTF-8 bytes,
   then repeatedly find the adjacent pair with the lowest merge rank and replace every
   non-overlapping occurrence of it, left to right, by the merge's token, until no pair has a
   rank. Only the data structures differ: ids in a C array, ranks in an open-addressing hash
   table keyed by the pair.

       merger = Merger(n_special, [(left, right, new_id), ...], cache_max_chars, cache_max_entries)
       merger.merge("hello") -> [ids]   (None for a piece over MAX_BYTES: Python handles it)
       merger.encode(pieces, cache, long_merge) -> ids of all pieces (BPETokenizer._encode_ordinary)

   Building is optional (setup.py): without a C compiler the package still installs, and
   BPETokenizer uses the pure-Python reference. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Pieces longer than this (in UTF-8 bytes) return None. The scan below is O(n^2) per piece,
   fine for words; the reference's heap merge takes the rare long run (e.g. 10k spaces). */
#define MAX_BYTES 256
#define EMPTY_KEY UINT64_MAX /* ids are < 2^31, so no real pair has this key */
#define NO_RANK INT32_MAX

typedef struct {
    uint64_t key; /* (left id << 32) | right id */
    int32_t rank;
    int32_t new_id;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint64_t mask;  /* table size - 1 (a power of two) */
    int shift;      /* 64 - log2(table size): the top bits of the multiplicative hash */
    int n_special;  /* byte b has id n_special + b */
    Py_ssize_t cache_max_chars, cache_max_entries; /* the encode cache's bounds (bpe.py's) */
} Merger;

static inline uint64_t pair_key(uint32_t a, uint32_t b) { return ((uint64_t)a << 32) | b; }

/* Fibonacci hashing: the multiply spreads the pair's bits, the top bits pick the slot. */
static inline uint64_t home_slot(const Merger *m, uint64_t key)
{
    return (key * 0x9E3779B97F4A7C15ull) >> m->shift;
}

static inline const Slot *find(const Merger *m, uint32_t a, uint32_t b)
{
    uint64_t key = pair_key(a, b);
    for (uint64_t i = home_slot(m, key);; i = (i + 1) & m->mask) {
        const Slot *s = &m->slots[i];
        if (s->key == key)
            return s;
        if (s->key == EMPTY_KEY)
            return NULL;
    }
}

static int Merger_init(Merger *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n_special", "merges", "cache_max_chars", "cache_max_entries", NULL};
    int n_special;
    PyObject *merges;
    Py_ssize_t cache_max_chars, cache_max_entries;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOnn", kwlist, &n_special, &merges,
                                     &cache_max_chars, &cache_max_entries))
        return -1;
    PyObject *seq = PySequence_Fast(merges, "merges must be a sequence of (left, right, new_id)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    /* At most half full, so probes stay short. */
    int bits = 4;
    while (((Py_ssize_t)1 << bits) < 2 * n + 2)
        bits++;
    Slot *slots = PyMem_Malloc(sizeof(Slot) << bits);
    if (slots == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < ((size_t)1 << bits); i++)
        slots[i].key = EMPTY_KEY;
    PyMem_Free(self->slots);
    self->slots = slots;
    self->mask = ((uint64_t)1 << bits) - 1;
    self->shift = 64 - bits;
    self->n_special = n_special;
    self->cache_max_chars = cache_max_chars;
    self->cache_max_entries = cache_max_entries;

    for (Py_ssize_t rank = 0; rank < n; rank++) {
        long a, b, new_id;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, rank), "lll", &a, &b, &new_id)) {
            Py_DECREF(seq);
            return -1;
        }
        if (a < 0 || b < 0 || new_id < 0 || a > INT32_MAX || b > INT32_MAX || new_id > INT32_MAX) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_ValueError, "merge #%zd: ids must be in 0..2^31-1", rank);
            return -1;
        }
        uint64_t key = pair_key((uint32_t)a, (uint32_t)b);
        uint64_t i = home_slot(self, key);
        while (slots[i].key != EMPTY_KEY && slots[i].key != key)
            i = (i + 1) & self->mask;
        if (slots[i].key == key)
            continue; /* a duplicate pair keeps its first (lowest) rank, like the dict in Python */
        slots[i].key = key;
        slots[i].rank = (int32_t)rank;
        slots[i].new_id = (int32_t)new_id;
    }
    Py_DECREF(seq);
    return 0;
}

static void Merger_dealloc(Merger *self)
{
    PyMem_Free(self->slots);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The ids of one piece (a new list), or None for a piece over MAX_BYTES. */
static PyObject *merge_piece(const Merger *self, PyObject *piece)
{
    if (!PyUnicode_Check(piece)) {
        PyErr_SetString(PyExc_TypeError, "merge() takes a str");
        return NULL;
    }
    Py_ssize_t n;
    PyObject *encoded = NULL;
    const char *raw = PyUnicode_AsUTF8AndSize(piece, &n); /* ASCII: no copy at all */
    if (raw == NULL) {
        /* A lone surrogate: strict UTF-8 refuses it; the reference encodes it with
           "surrogatepass" (three bytes), so do the same. */
        PyErr_Clear();
        encoded = PyUnicode_AsEncodedString(piece, "utf-8", "surrogatepass");
        if (encoded == NULL)
            return NULL;
        raw = PyBytes_AS_STRING(encoded);
        n = PyBytes_GET_SIZE(encoded);
    }
    if (n > MAX_BYTES) {
        Py_XDECREF(encoded);
        Py_RETURN_NONE;
    }
    int32_t ids[MAX_BYTES];
    for (Py_ssize_t i = 0; i < n; i++)
        ids[i] = self->n_special + (unsigned char)raw[i];
    Py_XDECREF(encoded);

    while (n > 1) {
        /* The lowest-ranked adjacent pair (a tie cannot happen: one pair has one rank). */
        int32_t best = NO_RANK, new_id = 0, a = 0, b = 0;
        for (Py_ssize_t i = 0; i + 1 < n; i++) {
            const Slot *s = find(self, (uint32_t)ids[i], (uint32_t)ids[i + 1]);
            if (s != NULL && s->rank < best) {
                best = s->rank;
                new_id = s->new_id;
                a = ids[i];
                b = ids[i + 1];
            }
        }
        if (best == NO_RANK)
            break;
        /* Replace every (a, b), left to right, in place: the write index never passes the
           read index. */
        Py_ssize_t w = 0;
        for (Py_ssize_t i = 0; i < n;) {
            if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
                ids[w++] = new_id;
                i += 2;
            } else {
                ids[w++] = ids[i++];
            }
        }
        n = w;
    }

    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(ids[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

static int check_ready(const Merger *self)
{
    if (self->slots != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Merger was not initialised");
    return -1;
}

static PyObject *Merger_merge(Merger *self, PyObject *piece)
{
    return check_ready(self) < 0 ? NULL : merge_piece(self, piece);
}

/* encode(pieces, cache, long_merge): BPETokenizer._encode_ordinary's loop over the pieces of one
   text. A piece's ids come from ``cache`` (a dict str -> list[int]) when it holds them, else
   from merge_piece, or from ``long_merge(piece)`` (the Python heap merge) for a piece over
   MAX_BYTES; a piece of at most cache_max_chars characters then goes into the cache, which is
   emptied first when it holds cache_max_entries. Returns all the ids, concatenated. */
static PyObject *Merger_encode(Merger *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_ready(self) < 0)
        return NULL;
    if (nargs != 3 || !PyList_Check(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "encode(pieces: list[str], cache: dict, long_merge)");
        return NULL;
    }
    PyObject *pieces = args[0], *cache = args[1], *long_merge = args[2];
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(pieces); k++) {
        PyObject *piece = PyList_GET_ITEM(pieces, k);
        Py_INCREF(piece); /* long_merge runs Python code: hold our own reference */
        PyObject *ids = PyDict_GetItemWithError(cache, piece);
        if (ids != NULL) {
            Py_INCREF(ids);
        } else if (!PyErr_Occurred()) {
            ids = merge_piece(self, piece);
            if (ids == Py_None) {
                Py_DECREF(ids);
                ids = PyObject_CallOneArg(long_merge, piece);
            }
            if (ids != NULL && PyUnicode_GET_LENGTH(piece) <= self->cache_max_chars) {
                if (PyDict_GET_SIZE(cache) >= self->cache_max_entries)
                    PyDict_Clear(cache); /* bounded memory on adversarial input */
                if (PyDict_SetItem(cache, piece, ids) < 0)
                    Py_CLEAR(ids);
            }
        }
        Py_DECREF(piece);
        if (ids == NULL)
            goto error;
        if (!PyList_Check(ids)) {
            Py_DECREF(ids);
            PyErr_SetString(PyExc_TypeError, "a piece's ids must be a list");
            goto error;
        }
        Py_ssize_t end = PyList_GET_SIZE(out);
        int failed = PyList_SetSlice(out, end, end, ids); /* out += ids */
        Py_DECREF(ids);
        if (failed < 0)
            goto error;
    }
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef Merger_methods[] = {
    {"merge", (PyCFunction)Merger_merge, METH_O,
     "merge(piece: str) -> list[int] | None: the ids of one pre-token (None if over MAX_BYTES)"},
    {"encode", (PyCFunction)(void (*)(void))Merger_encode, METH_FASTCALL,
     "encode(pieces: list[str], cache: dict, long_merge) -> list[int]: the ids of all pieces"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MergerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pocketgpt.tokenizer._bpe_core.Merger",
    .tp_doc = "Merger(n_special, merges, cache_max_chars, cache_max_entries): BPE merge "
              "tables; merges are (left, right, new_id) in rank order.",
    .tp_basicsize = sizeof(Merger),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Merger_init,
    .tp_dealloc = (destructor)Merger_dealloc,
    .tp_methods = Merger_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_bpe_core",
    .m_doc = "The compiled merge loop of pocketgpt's BPETokenizer (optional; see bpe.py).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__bpe_core(void)
{
    if (PyType_Ready(&MergerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&MergerType);
    if (PyModule_AddObject(m, "Merger", (PyObject *)&MergerType) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BYTES", MAX_BYTES) < 0) {
        Py_DECREF(&MergerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
