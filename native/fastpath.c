/*
 * fastpath.c - the hot calls as C callables (CPython vectorcall).
 *
 * A cffi call of two or more arguments goes through a tuple (METH_VARARGS)
 * and per-argument conversion, and a Python method around it adds a frame:
 * together several times the empty Python method the API is measured
 * against.  Here `Engine.transition`, `update_price` and `price` are
 * FastMethod descriptors on the class: vectorcall, exact-type checks on the
 * arguments, one direct call of the eng_* function on the Engine's view, the
 * result built in C.  They keep the GIL (these calls cannot block long).
 *
 * Nothing here is a second copy of the engine: the eng_* functions are the
 * ones compiled into engine._native (their addresses come from cffi), and
 * every number comes from engine.h.  Anything off the fast path -- another
 * argument type, keyword fields, a non-success status, an Engine with no
 * view (closed, or on Redis) -- goes to the Python method that owns the
 * behaviour:
 *   slow(engine, *args, **kwargs)  the full Python method (types, fields)
 *   fail(engine, rc, *args)        a status that is not plain success
 *
 * Lifetime.  The view (eng_seg) lives in the Engine itself: Engine derives
 * from EngineBase, whose C fields hold it (set and cleared by bind()).  A
 * call is always made on an Engine the caller holds:
 *   eng.price(pos)         method form: the descriptor gets the Engine as
 *                          its first argument (no object made);
 *   cb = eng.price         a BoundCall: holds the Engine strongly, as a bound
 *                          Python method holds self.
 * Nothing holds an Engine but its users: no reference cycle, so dropping the
 * last reference to an Engine (and to its kept calls) detaches it at once.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#include "engine.h"

enum { FAST_TRANSITION = 0, FAST_UPDATE_PRICE = 1, FAST_PRICE = 2 };

typedef int (*transition_fn)(eng_seg *, uint64_t, uint32_t);
typedef int (*update_price_fn)(eng_seg *, uint64_t, double);
typedef int (*read_price_fn)(eng_seg *, uint64_t, eng_price_out *);

/* price: results to fill again (see price_snapshot) */
typedef struct {
    PyObject *t[2];
    int next;              /* the spare replaced last */
} Spares;

/* The C part of every Engine (Engine derives from it). */
typedef struct {
    PyObject_HEAD
    eng_seg *seg;          /* the Engine's view; NULL: every call takes the Python method */
    PyObject *keep;        /* the cffi object that owns *seg */
    Spares spares;
} EngineBase;

/* Engine.transition / update_price / price: one per call kind, on the class. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    void *fn;              /* the eng_* function */
    PyObject *slow;        /* the Python method (a function) */
    PyObject *fail;        /* unbound: fail(engine, rc, *args) */
    PyObject *results;     /* transition: the Outcome members by code; price: PriceSnapshot */
} FastMethod;

/* eng.price taken as a value: the method and its Engine (held), with what
 * a call reads copied in, one load away.  The view is the Engine's at that
 * moment: close() zeroes that eng_seg (eng_detach), after which every C call
 * on it says ENG_ECLOSED and the call goes to the Python method's error. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;   /* bound_<kind> */
    void *fn;
    eng_seg *seg;          /* the Engine's view when bound (NULL: none) */
    PyObject *results;     /* borrowed from method */
    Spares spares;
    FastMethod *method;
    PyObject *engine;
    PyObject *keep;        /* the cffi object that owns *seg */
} BoundCall;

static PyTypeObject EngineBaseType, FastMethodType, BoundCallType;

/* slow(engine, *args, **kwargs), or fail(engine, rc, *args) when with_rc */
static PyObject *fallback(FastMethod *m, PyObject *engine, PyObject *const *args, Py_ssize_t n,
                          PyObject *kwnames, int with_rc, int rc)
{
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
    Py_INCREF(engine);   /* held for the call, whatever the callee does */
    PyObject *out = PyObject_Vectorcall(with_rc ? m->fail : m->slow, stack, lead + n,
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
 * only this Engine), as zip() and enumerate() reuse their result tuples.
 * Two spares, so `snap = eng.price(pos)` in a loop, which still holds the
 * last result while it asks for the next, reuses them in turn.  The items
 * are floats and ints, so dropping the old ones runs no Python code, and a
 * tuple the collector untracked (atoms only) stays right untracked. */
static inline __attribute__((always_inline)) PyObject *
price_snapshot(Spares *f, PyObject *type_, const eng_price_out *p)
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
        if (f->t[k] && Py_REFCNT(f->t[k]) == 1)
            t = f->t[k];
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
    PyTypeObject *type = (PyTypeObject *)type_;
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
    Py_XSETREF(f->t[f->next], t);
    Py_INCREF(t);
#endif
    return t;
}

/* One hot call on `engine` with the call's own arguments; seg, kind, fn,
 * results and spares come from the caller (method_call or bound_call, one
 * of each per kind, so `kind` is a constant here). */
static inline __attribute__((always_inline)) PyObject *
fast_run(FastMethod *m, int kind, void *fn, PyObject *results, eng_seg *seg, Spares *spares,
         PyObject *engine, PyObject *const *args, Py_ssize_t n, PyObject *kwnames)
{
    uint64_t id;
    if (__builtin_expect(!seg || (kwnames && PyTuple_GET_SIZE(kwnames)) ||
                         n != (kind == FAST_PRICE ? 1 : 2) || as_id(args[0], &id), 0))
        return fallback(m, engine, args, n, kwnames, 0, 0);
    int rc;
    switch (kind) {
    case FAST_TRANSITION: {
        PyObject *t = args[1];
        if (!PyLong_Check(t) || PyBool_Check(t))   /* int or a Trigger (IntEnum); never a bool */
            return fallback(m, engine, args, n, kwnames, 0, 0);
        unsigned long trigger = PyLong_AsUnsignedLong(t);
        if ((trigger == (unsigned long)-1 && PyErr_Occurred()) || trigger > UINT32_MAX) {
            PyErr_Clear();
            return fallback(m, engine, args, n, kwnames, 0, 0);
        }
        rc = ((transition_fn)fn)(seg, id, (uint32_t)trigger);
        if (rc >= 0 && rc < PyTuple_GET_SIZE(results)) {
            PyObject *outcome = PyTuple_GET_ITEM(results, rc);
            Py_INCREF(outcome);
            return outcome;
        }
        break;
    }
    case FAST_UPDATE_PRICE:
        if (!PyFloat_CheckExact(args[1]))
            return fallback(m, engine, args, n, kwnames, 0, 0);
        rc = ((update_price_fn)fn)(seg, id, PyFloat_AS_DOUBLE(args[1]));
        if (rc == 0)
            Py_RETURN_NONE;
        break;
    default: {
        eng_price_out out;
        rc = ((read_price_fn)fn)(seg, id, &out);
        if (rc == 0)
            return price_snapshot(spares, results, &out);
        break;
    }
    }
    return fallback(m, engine, args, n, NULL, 1, rc);
}

/* Engine.price(eng, pos) and eng.price(pos) (method form): the Engine comes
 * first.  cb = eng.price; cb(pos): a BoundCall.  One of each per kind. */
#define FAST_ENTRY_POINTS(KIND, suffix)                                                          \
    static PyObject *method_##suffix(PyObject *self, PyObject *const *args, size_t nargsf,      \
                                     PyObject *kwnames)                                         \
    {                                                                                           \
        FastMethod *m = (FastMethod *)self;                                                     \
        Py_ssize_t n = PyVectorcall_NARGS(nargsf);                                              \
        if (n < 1 || !PyObject_TypeCheck(args[0], &EngineBaseType))   /* Python says */         \
            return PyObject_Vectorcall(m->slow, args, nargsf, kwnames);                         \
        EngineBase *e = (EngineBase *)args[0];                                                  \
        return fast_run(m, KIND, m->fn, m->results, e->seg, &e->spares, args[0], args + 1,      \
                        n - 1, kwnames);                                                        \
    }                                                                                           \
    static PyObject *bound_##suffix(PyObject *self, PyObject *const *args, size_t nargsf,       \
                                    PyObject *kwnames)                                          \
    {                                                                                           \
        BoundCall *b = (BoundCall *)self;                                                       \
        return fast_run(b->method, KIND, b->fn, b->results, b->seg, &b->spares, b->engine,      \
                        args, PyVectorcall_NARGS(nargsf), kwnames);                             \
    }
FAST_ENTRY_POINTS(FAST_TRANSITION, transition)
FAST_ENTRY_POINTS(FAST_UPDATE_PRICE, update_price)
FAST_ENTRY_POINTS(FAST_PRICE, price)

static const vectorcallfunc method_calls[] = {method_transition, method_update_price,
                                              method_price};
static const vectorcallfunc bound_calls[] = {bound_transition, bound_update_price, bound_price};

/* eng.price as a value: a BoundCall holding eng; Engine.price: the descriptor */
static PyObject *method_get(PyObject *self, PyObject *obj, PyObject *type)
{
    (void)type;
    if (!obj || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    if (!PyObject_TypeCheck(obj, &EngineBaseType))
        return PyMethod_New(self, obj);
    FastMethod *m = (FastMethod *)self;
    EngineBase *e = (EngineBase *)obj;
    BoundCall *b = PyObject_GC_New(BoundCall, &BoundCallType);
    if (!b)
        return NULL;
    b->vectorcall = bound_calls[m->kind];
    b->fn = m->fn;
    b->seg = e->seg;
    b->results = m->results;
    b->spares = (Spares){{NULL, NULL}, 0};
    Py_INCREF(self);
    b->method = m;
    Py_INCREF(obj);
    b->engine = obj;
    Py_XINCREF(e->keep);
    b->keep = e->keep;
    PyObject_GC_Track(b);
    return (PyObject *)b;
}

static PyObject *method_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    int kind;
    unsigned long long fn;
    PyObject *slow, *fail, *results;
    static char *names[] = {"kind", "fn", "slow", "fail", "results", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iKOOO", names, &kind, &fn, &slow, &fail,
                                     &results))
        return NULL;
    if (kind < FAST_TRANSITION || kind > FAST_PRICE || !fn || !PyCallable_Check(slow) ||
        !PyCallable_Check(fail) ||
        (kind == FAST_TRANSITION && !PyTuple_Check(results)) ||
        (kind == FAST_PRICE && !(PyType_Check(results) &&
                                 PyType_IsSubtype((PyTypeObject *)results, &PyTuple_Type)))) {
        PyErr_SetString(PyExc_ValueError, "FastMethod: bad arguments");
        return NULL;
    }
    FastMethod *m = (FastMethod *)type->tp_alloc(type, 0);
    if (!m)
        return NULL;
    m->vectorcall = method_calls[kind];
    m->kind = kind;
    m->fn = (void *)(uintptr_t)fn;
    Py_INCREF(slow);
    m->slow = slow;
    Py_INCREF(fail);
    m->fail = fail;
    Py_INCREF(results);
    m->results = results;
    return (PyObject *)m;
}

static int method_traverse(PyObject *self, visitproc visit, void *arg)
{
    FastMethod *m = (FastMethod *)self;
    Py_VISIT(m->slow);
    Py_VISIT(m->fail);
    Py_VISIT(m->results);
    return 0;
}

static int method_clear(PyObject *self)
{
    FastMethod *m = (FastMethod *)self;
    Py_CLEAR(m->slow);
    Py_CLEAR(m->fail);
    Py_CLEAR(m->results);
    return 0;
}

static void method_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    method_clear(self);
    Py_TYPE(self)->tp_free(self);
}

/* __doc__, __name__, __qualname__ of the Python method */
static PyObject *method_attr(PyObject *self, void *name)
{
    return PyObject_GetAttrString(((FastMethod *)self)->slow, (const char *)name);
}

static PyObject *bound_attr(PyObject *self, void *name)
{
    return PyObject_GetAttrString(((BoundCall *)self)->method->slow, (const char *)name);
}

static PyGetSetDef method_getset[] = {
    {"__doc__", method_attr, NULL, NULL, "__doc__"},
    {"__name__", method_attr, NULL, NULL, "__name__"},
    {"__qualname__", method_attr, NULL, NULL, "__qualname__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef method_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(FastMethod, slow), READONLY, "the Python method"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._fastpath.FastMethod",
    .tp_doc = "A hot Engine method in C (see native/fastpath.c).",
    .tp_basicsize = sizeof(FastMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = method_new,
    .tp_dealloc = method_dealloc,
    .tp_traverse = method_traverse,
    .tp_clear = method_clear,
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = method_get,
    .tp_vectorcall_offset = offsetof(FastMethod, vectorcall),
    .tp_getset = method_getset,
    .tp_members = method_members,
};

static int bound_traverse(PyObject *self, visitproc visit, void *arg)
{
    BoundCall *b = (BoundCall *)self;
    Py_VISIT(b->method);
    Py_VISIT(b->engine);
    return 0;
}

static int bound_clear(PyObject *self)
{
    BoundCall *b = (BoundCall *)self;
    b->seg = NULL;   /* a call after this takes the Python method (none can follow) */
    Py_CLEAR(b->engine);
    Py_CLEAR(b->keep);
    Py_CLEAR(b->spares.t[0]);
    Py_CLEAR(b->spares.t[1]);
    return 0;
}

static void bound_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    bound_clear(self);
    Py_CLEAR(((BoundCall *)self)->method);
    PyObject_GC_Del(self);
}

static PyGetSetDef bound_getset[] = {
    {"__doc__", bound_attr, NULL, NULL, "__doc__"},
    {"__name__", bound_attr, NULL, NULL, "__name__"},
    {"__qualname__", bound_attr, NULL, NULL, "__qualname__"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef bound_members[] = {
    {"__self__", T_OBJECT, offsetof(BoundCall, engine), READONLY, "the Engine"},
    {"__func__", T_OBJECT, offsetof(BoundCall, method), READONLY, "the method"},
    {NULL, 0, 0, 0, NULL},
};

/* bound_clear runs only on an unreachable cycle (the collector) or at
 * dealloc; it keeps method (results are borrowed from it), which holds no
 * Engine, so a cycle through the Engine is still broken. */
static PyTypeObject BoundCallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._fastpath.BoundCall",
    .tp_doc = "A hot Engine method bound to its Engine (holds it, as a bound method does).",
    .tp_basicsize = sizeof(BoundCall),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_dealloc = bound_dealloc,
    .tp_traverse = bound_traverse,
    .tp_clear = bound_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(BoundCall, vectorcall),
    .tp_getset = bound_getset,
    .tp_members = bound_members,
};

static void base_dealloc(PyObject *self)
{
    EngineBase *e = (EngineBase *)self;
    e->seg = NULL;
    Py_CLEAR(e->keep);
    Py_CLEAR(e->spares.t[0]);
    Py_CLEAR(e->spares.t[1]);
    Py_TYPE(self)->tp_free(self);
}

/* Neither keep (cffi data) nor the spares (tuples of floats and ints) can
 * reach an Engine: EngineBase needs no traverse of its own. */
static PyTypeObject EngineBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine._fastpath.EngineBase",
    .tp_doc = "The C part of an Engine: its view for the hot calls (see native/fastpath.c).",
    .tp_basicsize = sizeof(EngineBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = base_dealloc,
};

/* bind(engine, seg, keep): the view the hot calls use (seg: its address;
 * keep: the cffi object owning it); bind(engine, 0, None): none, every call
 * takes the Python method. */
static PyObject *bind(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *engine, *keep;
    unsigned long long seg;
    if (!PyArg_ParseTuple(args, "O!KO", &EngineBaseType, &engine, &seg, &keep))
        return NULL;
    if (!seg != (keep == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "bind: a view and its owner, or 0 and None");
        return NULL;
    }
    EngineBase *e = (EngineBase *)engine;
    e->seg = (eng_seg *)(uintptr_t)seg;
    Py_INCREF(keep);
    Py_XSETREF(e->keep, keep);
    return Py_NewRef(Py_None);
}

static PyMethodDef fastpath_functions[] = {
    {"bind", bind, METH_VARARGS, "bind(engine, seg, keep): the view of an Engine's hot calls."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "engine._fastpath",
    "The hot Engine calls as C callables (see native/fastpath.c).", -1, fastpath_functions,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&EngineBaseType) < 0 || PyType_Ready(&FastMethodType) < 0 ||
        PyType_Ready(&BoundCallType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "EngineBase", (PyObject *)&EngineBaseType) < 0 ||
        PyModule_AddObjectRef(m, "FastMethod", (PyObject *)&FastMethodType) < 0 ||
        PyModule_AddObjectRef(m, "BoundCall", (PyObject *)&BoundCallType) < 0 ||
        PyModule_AddIntConstant(m, "TRANSITION", FAST_TRANSITION) < 0 ||
        PyModule_AddIntConstant(m, "UPDATE_PRICE", FAST_UPDATE_PRICE) < 0 ||
        PyModule_AddIntConstant(m, "PRICE", FAST_PRICE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
