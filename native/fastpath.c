/*
 * fastpath.c - the hot calls as C callables (CPython vectorcall).
 *
 * A cffi call of two or more arguments goes through a tuple (METH_VARARGS)
 * and per-argument conversion, and a Python method around it adds a frame:
 * together several times the empty Python method the API is measured
 * against.  Here `Engine.transition`, `update_price` and `price` of a
 * shared-memory Engine are FastCall objects: vectorcall, exact-type checks
 * on the arguments, one direct call of the eng_* function, the result built
 * in C.  They keep the GIL (these calls cannot block long).
 *
 * Nothing here is a second copy of the engine: the eng_* functions are the
 * ones compiled into engine._native (their addresses come from cffi), and
 * every number comes from engine.h.  Anything off the fast path -- another
 * argument type, keyword fields, a non-success status -- goes to the Python
 * method that owns the behaviour:
 *   slow(engine, *args, **kwargs)  the full Python method (types, fields)
 *   fail(engine, rc, *args)        a status that is not plain success
 * The Engine is held by a weak reference (no reference cycle, so dropping
 * the last reference still detaches at once).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "engine.h"

enum { FAST_TRANSITION = 0, FAST_UPDATE_PRICE = 1, FAST_PRICE = 2 };

typedef int (*transition_fn)(eng_seg *, uint64_t, uint32_t);
typedef int (*update_price_fn)(eng_seg *, uint64_t, double);
typedef int (*read_price_fn)(eng_seg *, uint64_t, eng_price_out *);

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    void *fn;              /* the eng_* function */
    eng_seg *seg;          /* the Engine's view */
    PyObject *keep;        /* the cffi object that owns *seg */
    PyObject *owner;       /* weakref to the Engine */
    PyObject *slow;        /* unbound Python method */
    PyObject *fail;        /* unbound: fail(engine, rc, *args) */
    PyObject *results;     /* transition: the Outcome members by code; price: PriceSnapshot */
    PyObject *spare[2];    /* price: results to fill again (see price_snapshot) */
    int next;              /* price: the spare replaced last */
} FastCall;

/* slow(engine, *args, **kwargs), or fail(engine, rc, *args) when rc is set */
static PyObject *fallback(FastCall *f, PyObject *const *args, size_t nargsf, PyObject *kwnames,
                          int with_rc, int rc)
{
    PyObject *engine = PyWeakref_GetObject(f->owner);   /* borrowed */
    if (engine == Py_None) {
        PyErr_SetString(PyExc_ReferenceError, "the Engine of this call is gone");
        return NULL;
    }
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t lead = with_rc ? 2 : 1;
    PyObject *small[8];
    PyObject **stack = small;
    if (n + nkw + lead > 8) {
        stack = PyMem_Malloc((size_t)(n + nkw + lead) * sizeof *stack);
        if (!stack)
            return PyErr_NoMemory();
    }
    PyObject *code = NULL;
    stack[0] = engine;
    if (with_rc) {
        code = PyLong_FromLong(rc);
        if (!code) {
            if (stack != small)
                PyMem_Free(stack);
            return NULL;
        }
        stack[1] = code;
    }
    for (Py_ssize_t i = 0; i < n + nkw; i++)
        stack[lead + i] = args[i];
    Py_INCREF(engine);   /* the weakref's referent, held for the call */
    PyObject *out = PyObject_Vectorcall(with_rc ? f->fail : f->slow, stack, lead + n,
                                        with_rc ? NULL : kwnames);
    Py_DECREF(engine);
    if (stack != small)
        PyMem_Free(stack);
    Py_XDECREF(code);
    return out;
}

/* an exact int that fits uint64_t, else -1 (nothing raised) */
static int as_id(PyObject *o, uint64_t *out)
{
    if (!PyLong_CheckExact(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = v;
    return 0;
}

/* The PriceSnapshot of p.  Its five items are new; the tuple is a spare this
 * call made before when no one else holds it any more (reference count 1:
 * only this FastCall), as zip() and enumerate() reuse their result tuples.
 * Two spares, so `snap = eng.price(pos)` in a loop, which still holds the
 * last result while it asks for the next, reuses them in turn.  The items
 * are floats and ints, so dropping the old ones runs no Python code, and a
 * tuple the collector untracked (atoms only) stays right untracked. */
static PyObject *price_snapshot(FastCall *f, const eng_price_out *p)
{
    PyObject *items[5] = {PyFloat_FromDouble(p->price), PyLong_FromLongLong(p->ts_ns),
                          PyFloat_FromDouble(p->pnl_pct), PyFloat_FromDouble(p->pnl_usd),
                          PyLong_FromUnsignedLongLong(p->version)};
    for (int i = 0; i < 5; i++)
        if (!items[i]) {
            for (int j = 0; j < 5; j++)
                Py_XDECREF(items[j]);
            return NULL;
        }
    PyObject *t = NULL;
#ifndef Py_GIL_DISABLED   /* the count test needs the GIL */
    for (int k = 0; k < 2 && !t; k++)
        if (f->spare[k] && Py_REFCNT(f->spare[k]) == 1)
            t = f->spare[k];
#endif
    if (t) {
        PyObject *old[5];
        for (int i = 0; i < 5; i++) {
            old[i] = PyTuple_GET_ITEM(t, i);
            PyTuple_SET_ITEM(t, i, items[i]);
        }
        for (int i = 0; i < 5; i++)
            Py_DECREF(old[i]);
        Py_INCREF(t);
        return t;
    }
    PyTypeObject *type = (PyTypeObject *)f->results;
    t = type->tp_alloc(type, 5);
    if (!t) {
        for (int i = 0; i < 5; i++)
            Py_DECREF(items[i]);
        return NULL;
    }
    for (int i = 0; i < 5; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
#ifndef Py_GIL_DISABLED
    f->next ^= 1;   /* both spares are held elsewhere: replace the older */
    Py_XSETREF(f->spare[f->next], t);
    Py_INCREF(t);
#endif
    return t;
}

static PyObject *fast_call(PyObject *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames)
{
    FastCall *f = (FastCall *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t id;
    if ((kwnames && PyTuple_GET_SIZE(kwnames)) || n != (f->kind == FAST_PRICE ? 1 : 2) ||
        as_id(args[0], &id))
        return fallback(f, args, nargsf, kwnames, 0, 0);
    int rc;
    switch (f->kind) {
    case FAST_TRANSITION: {
        PyObject *t = args[1];
        if (!PyLong_Check(t) || PyBool_Check(t))   /* int or a Trigger (IntEnum); never a bool */
            return fallback(f, args, nargsf, kwnames, 0, 0);
        unsigned long trigger = PyLong_AsUnsignedLong(t);
        if ((trigger == (unsigned long)-1 && PyErr_Occurred()) || trigger > UINT32_MAX) {
            PyErr_Clear();
            return fallback(f, args, nargsf, kwnames, 0, 0);
        }
        rc = ((transition_fn)f->fn)(f->seg, id, (uint32_t)trigger);
        if (rc >= 0 && rc < PyTuple_GET_SIZE(f->results)) {
            PyObject *outcome = PyTuple_GET_ITEM(f->results, rc);
            Py_INCREF(outcome);
            return outcome;
        }
        break;
    }
    case FAST_UPDATE_PRICE:
        if (!PyFloat_CheckExact(args[1]))
            return fallback(f, args, nargsf, kwnames, 0, 0);
        rc = ((update_price_fn)f->fn)(f->seg, id, PyFloat_AS_DOUBLE(args[1]));
        if (rc == 0)
            Py_RETURN_NONE;
        break;
    default: {
        eng_price_out out;
        rc = ((read_price_fn)f->fn)(f->seg, id, &out);
        if (rc == 0)
            return price_snapshot(f, &out);
        break;
    }
    }
    return fallback(f, args, nargsf, NULL, 1, rc);
}

static PyObject *fast_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    int kind;
    unsigned long long fn, seg;
    PyObject *keep, *owner, *slow, *fail, *results;
    static char *names[] = {"kind", "fn", "seg", "keep", "owner", "slow", "fail", "results",
                            NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKKOOOOO", names, &kind, &fn, &seg, &keep,
                                     &owner, &slow, &fail, &results))
        return NULL;
    if (kind < FAST_TRANSITION || kind > FAST_PRICE || !fn || !seg || !PyWeakref_Check(owner) ||
        (kind == FAST_TRANSITION && !PyTuple_Check(results)) ||
        (kind == FAST_PRICE && !(PyType_Check(results) &&
                                 PyType_IsSubtype((PyTypeObject *)results, &PyTuple_Type)))) {
        PyErr_SetString(PyExc_ValueError, "FastCall: bad arguments");
        return NULL;
    }
    FastCall *f = (FastCall *)type->tp_alloc(type, 0);
    if (!f)
        return NULL;
    f->vectorcall = fast_call;
    f->kind = kind;
    f->fn = (void *)(uintptr_t)fn;
    f->seg = (eng_seg *)(uintptr_t)seg;
    Py_INCREF(keep);
    f->keep = keep;
    Py_INCREF(owner);
    f->owner = owner;
    Py_INCREF(slow);
    f->slow = slow;
    Py_INCREF(fail);
    f->fail = fail;
    Py_INCREF(results);
    f->results = results;
    return (PyObject *)f;
}

static void fast_dealloc(PyObject *self)
{
    FastCall *f = (FastCall *)self;
    Py_XDECREF(f->keep);
    Py_XDECREF(f->owner);
    Py_XDECREF(f->slow);
    Py_XDECREF(f->fail);
    Py_XDECREF(f->results);
    Py_XDECREF(f->spare[0]);
    Py_XDECREF(f->spare[1]);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject FastCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._fastpath.FastCall",
    .tp_doc = "A hot Engine call in C (see native/fastpath.c).",
    .tp_basicsize = sizeof(FastCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = fast_new,
    .tp_dealloc = fast_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FastCall, vectorcall),
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "engine._fastpath",
    "The hot Engine calls as C callables (see native/fastpath.c).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FastCallType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m)
        return NULL;
    Py_INCREF(&FastCallType);
    if (PyModule_AddObject(m, "FastCall", (PyObject *)&FastCallType) < 0 ||
        PyModule_AddIntConstant(m, "TRANSITION", FAST_TRANSITION) < 0 ||
        PyModule_AddIntConstant(m, "UPDATE_PRICE", FAST_UPDATE_PRICE) < 0 ||
        PyModule_AddIntConstant(m, "PRICE", FAST_PRICE) < 0) {
        Py_DECREF(&FastCallType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
