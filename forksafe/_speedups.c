/* C versions of the pools' hot paths; see forksafe/speedups.py.
 *
 * Each function here replaces a Python method of the same name on a forksafe class and
 * handles only that method's common case, exactly as the Python method does. Anything
 * else (another process, a closed or recycled connection, a failure, arguments it does
 * not take) goes to the Python method it replaced, kept on the class as _py_<name>, or
 * to the Python helpers that method calls, before this code has changed anything.
 *
 * The fields read here are __slots__ of the Python classes: their offsets are taken from
 * the classes' member descriptors at install(), and every object is type-checked against
 * the class whose offsets are used before a field is read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#ifndef _WIN32
#include <poll.h>
#define HAVE_QUIET 1
#endif

#define FIELD(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* The classes and the offsets of their slots. */
static PyTypeObject *pool_type, *proxy_type, *dedicated_type, *con_type, *cursor_type;

static Py_ssize_t pool_pid, pool_warm, pool_maxshared, pool_slots, pool_taken, pool_idle,
    pool_recycling, pool_leaktime, pool_lean_return, pool_reset, pool_given_back;
static Py_ssize_t proxy_pool, proxy_con;
static Py_ssize_t con_con, con_closed, con_token, con_plain, con_plain_ping, con_ping,
    con_transaction, con_reconnects, con_in_transaction, con_failures, con_cursor_class,
    con_pinger, con_quiet;
static Py_ssize_t cur_con, cur_cursor, cur_closed, cur_sized;

/* fork.page (its byte 0 is zeroed in a forked child) and fork.armed (byte 0: the
 * process's token), held for the life of the process; fork's namespace for cached_pid. */
static Py_buffer page_view, armed_view;
static PyObject *fork_dict;
static PyObject *armed_int[256]; /* the ints 0..255, strong */
static PyObject *queue_empty;

static PyObject *s_cached_pid, *s_get, *s_put, *s_popleft, *s_append, *s_cursor, *s_execute,
    *s_fetchone, *s_close, *s_rollback, *s_ping, *s_made_for, *s_adopt, *s_cursor_failed,
    *s_execute_failed, *s_wait_for_token, *s_fit, *s_ping_raised, *s_ping_dead, *s_ping_check,
    *s_drop_checkout, *s_lease, *s_count_reconnects, *s_rollback_ = NULL,
    *s_rollback_failed, *s_py_connection, *s_py_cursor, *s_py_close, *s_py_del,
    *s_py_execute, *s_py_fetchone, *s_sock;

/* -- helpers ------------------------------------------------------------------------ */

/* Truth of a field: -1 (an error set) for a missing one or a failing __bool__. */
static int
truth(PyObject *value)
{
    if (value == Py_True)
        return 1;
    if (value == Py_False || value == Py_None)
        return 0;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "forksafe: slot not set");
        return -1;
    }
    return PyObject_IsTrue(value);
}

/* Whether a connection's token is the armed one (the process that made it, known). */
static int
token_armed(PyObject *con)
{
    PyObject *token = FIELD(con, con_token);
    if (token == NULL || !PyLong_CheckExact(token))
        return 0;
    if (token == armed_int[((unsigned char *)armed_view.buf)[0]])
        return 1; /* small ints are shared: the common case without converting */
    long value = PyLong_AsLong(token);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return value == ((unsigned char *)armed_view.buf)[0];
}

/* Whether ``pool``'s pid is this process's, by the page (no system call). */
static int
pool_pid_current(PyObject *pool)
{
    if (!((unsigned char *)page_view.buf)[0])
        return 0;
    PyObject *pid = FIELD(pool, pool_pid);
    PyObject *cached = PyDict_GetItemWithError(fork_dict, s_cached_pid); /* borrowed */
    if (pid == NULL || cached == NULL) {
        PyErr_Clear();
        return 0;
    }
    if (pid == cached)
        return 1;
    int equal = PyObject_RichCompareBool(pid, cached, Py_EQ);
    if (equal < 0) {
        PyErr_Clear();
        return 0;
    }
    return equal;
}

/* Methods looked up before, one entry per method name (the type it was last found on):
 * what PyObject_VectorcallMethod finds each time, for objects without an instance
 * __dict__ whose type looks attributes up the usual way (the driver's connections and
 * cursors, deques, queues). An entry holds while its type's version tag is the one it
 * was found under: changing a type sets its tag to 0, and a tag is never given twice. */
typedef struct {
    PyObject *name;     /* interned and kept by this module: compared by address */
    PyTypeObject *type; /* strong */
    PyObject *method;   /* strong */
    unsigned int tag;
    int direct; /* a C method of a class ``type`` derives from: call_c() may call it */
} found_t;

#define FOUND_SIZE 64 /* more than the names this module calls methods by */
static found_t found[FOUND_SIZE];

/* The entry of ``name`` (claimed when new), or NULL when the table is full. */
static found_t *
found_entry(PyObject *name)
{
    size_t start = ((size_t)name >> 4) % FOUND_SIZE;
    for (size_t i = 0; i < FOUND_SIZE; i++) {
        found_t *entry = &found[(start + i) % FOUND_SIZE];
        if (entry->name == name)
            return entry;
        if (entry->name == NULL) {
            entry->name = name;
            return entry;
        }
    }
    return NULL;
}

typedef PyObject *(*fast_t)(PyObject *, PyObject *const *, Py_ssize_t);
typedef PyObject *(*fast_kw_t)(PyObject *, PyObject *const *, Py_ssize_t, PyObject *);

/* Call ``method``, a C method descriptor of a class args[0] is an instance of, as calling
 * it through the descriptor would (which checks the instance's class again), by the
 * calling convention of its C function. */
static PyObject *
call_c(PyObject *method, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyMethodDef *def = ((PyMethodDescrObject *)method)->d_method;
    PyObject *self = args[0];
    switch (def->ml_flags &
            (METH_VARARGS | METH_FASTCALL | METH_NOARGS | METH_O | METH_KEYWORDS | METH_METHOD)) {
    case METH_NOARGS:
        if (nargs == 1 && kwnames == NULL)
            return def->ml_meth(self, NULL);
        break;
    case METH_O:
        if (nargs == 2 && kwnames == NULL)
            return def->ml_meth(self, args[1]);
        break;
    case METH_FASTCALL:
        if (kwnames == NULL)
            return ((fast_t)(void (*)(void))def->ml_meth)(self, args + 1, nargs - 1);
        break;
    case METH_FASTCALL | METH_KEYWORDS:
        return ((fast_kw_t)(void (*)(void))def->ml_meth)(self, args + 1, nargs - 1, kwnames);
    }
    return PyObject_Vectorcall(method, args, nargs, kwnames);
}

/* Whether call_c() may call ``method`` on instances of ``type``. */
static int
callable_in_c(PyObject *method, PyTypeObject *type)
{
    return Py_IS_TYPE(method, &PyMethodDescr_Type) &&
           (type == PyDescr_TYPE(method) || PyType_IsSubtype(type, PyDescr_TYPE(method)));
}

/* PyObject_VectorcallMethod(name, args, nargsf, kwnames), args[0] the object and the
 * PY_VECTORCALL_ARGUMENTS_OFFSET flag meaning args[0] may be overwritten. */
static PyObject *
call_method(PyObject *name, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyTypeObject *type = Py_TYPE(args[0]);
    found_t *entry = found_entry(name);
    if (entry != NULL && entry->type == type && entry->tag == type->tp_version_tag &&
        entry->tag != 0) {
        PyObject *method = Py_NewRef(entry->method); /* the call may refill the entry */
        Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
        PyObject *result = entry->direct ? call_c(method, args, nargs, kwnames)
                                         : PyObject_Vectorcall(method, args, nargs, kwnames);
        Py_DECREF(method);
        return result;
    }
    if (entry != NULL && type->tp_dictoffset == 0 &&
        type->tp_getattro == PyObject_GenericGetAttr) {
        PyObject *method = _PyType_Lookup(type, name); /* borrowed */
        if (method != NULL && (Py_TYPE(method)->tp_flags & Py_TPFLAGS_METHOD_DESCRIPTOR) &&
            type->tp_version_tag != 0) {
            PyTypeObject *old_type = entry->type;
            PyObject *old_method = entry->method;
            entry->type = (PyTypeObject *)Py_NewRef(type);
            entry->method = Py_NewRef(method);
            entry->tag = type->tp_version_tag;
            entry->direct = callable_in_c(method, type);
            Py_XDECREF(old_method);
            Py_XDECREF(old_type);
            return call_method(name, args, nargsf, kwnames); /* now found */
        }
    }
    return PyObject_VectorcallMethod(name, args, nargsf, kwnames);
}

static PyObject *
call0(PyObject *self, PyObject *name)
{
    return call_method(name, &self, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call1(PyObject *self, PyObject *name, PyObject *arg)
{
    PyObject *args[2] = {self, arg};
    return call_method(name, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* Call and drop the result; 0 or -1 (error set). */
static int
run0(PyObject *self, PyObject *name)
{
    PyObject *result = call0(self, name);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

static int
run1(PyObject *self, PyObject *name, PyObject *arg)
{
    PyObject *result = call1(self, name, arg);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

/* next(counter), the result dropped. */
static int
count(PyObject *counter)
{
    iternextfunc next = Py_TYPE(counter)->tp_iternext;
    PyObject *value = next == NULL ? NULL : next(counter);
    if (value == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "forksafe: counter exhausted");
        return -1;
    }
    Py_DECREF(value);
    return 0;
}

/* The raised exception as one object (the traceback attached), the error cleared. */
static PyObject *
take_error(void)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback != NULL && value != NULL)
        PyException_SetTraceback(value, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return value;
}

/* Raise ``error`` again (a normalised exception from take_error(); the reference is
 * passed on), its traceback kept. */
static void
raise_again(PyObject *error)
{
    PyObject *traceback = PyException_GetTraceback(error);
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(error)), error, traceback);
}

/* PyObject_VectorcallMethod(name, args, nargsf) while ``error`` is the exception being
 * handled, as a call in a Python ``except`` block: sys.exc_info() shows it, and what the
 * call raises has it as __context__. */
static PyObject *
call_handling(PyObject *error, PyObject *name, PyObject *const *args, size_t nargsf)
{
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *saved = PyErr_GetHandledException();
    PyErr_SetHandledException(error);
    PyObject *result = PyObject_VectorcallMethod(name, args, nargsf, NULL);
    PyErr_SetHandledException(saved);
    Py_XDECREF(saved);
#else
    PyObject *type, *value, *traceback;
    PyErr_GetExcInfo(&type, &value, &traceback);
    PyErr_SetExcInfo(Py_NewRef((PyObject *)Py_TYPE(error)), Py_NewRef(error),
                     PyException_GetTraceback(error));
    PyObject *result = PyObject_VectorcallMethod(name, args, nargsf, NULL);
    PyErr_SetExcInfo(type, value, traceback);
#endif
    return result;
}

/* Fall back to the Python method kept as ``name``, with a vectorcall's arguments. */
static PyObject *
fall_back(PyObject *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs,
          PyObject *kwnames)
{
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *small[8];
    PyObject **stack = small;
    if (total + 1 > 8) {
        stack = PyMem_Malloc((total + 1) * sizeof(PyObject *));
        if (stack == NULL)
            return PyErr_NoMemory();
    }
    stack[0] = self;
    for (Py_ssize_t i = 0; i < total; i++)
        stack[i + 1] = args[i];
    PyObject *result = call_method(name, stack, nargs + 1, kwnames);
    if (stack != small)
        PyMem_Free(stack);
    return result;
}

/* -- SteadyDBConnection.cursor() and the proxies' cursor() --------------------------- */

/* A steady cursor on ``con`` without arguments: the fast path of
 * SteadyDBConnection.cursor(). NULL with no error set: not the fast path's case. */
static PyObject *
plain_cursor(PyObject *con)
{
    int plain = truth(FIELD(con, con_plain));
    if (plain <= 0 || !token_armed(con)) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *cls = FIELD(con, con_cursor_class);
    PyObject *driver_con = FIELD(con, con_con);
    if (cls == NULL || driver_con == NULL || !PyType_Check(cls) ||
        (cls != (PyObject *)cursor_type && !PyType_IsSubtype((PyTypeObject *)cls, cursor_type)))
        return NULL;
    PyTypeObject *kind = (PyTypeObject *)cls;
    Py_INCREF(kind); /* _adopt() or a reconnect may replace the class on con */
    Py_INCREF(driver_con);
    PyObject *cursor = call0(driver_con, s_cursor);
    Py_DECREF(driver_con);
    if (cursor == NULL) {
        PyObject *failures = FIELD(con, con_failures);
        if (failures == NULL || !PyErr_ExceptionMatches(failures)) {
            Py_DECREF(kind);
            return NULL; /* error set: raised as the Python code would */
        }
        PyObject *error = take_error();
        PyObject *no_args = PyTuple_New(0);
        PyObject *no_kwargs = PyDict_New();
        if (error != NULL && no_args != NULL && no_kwargs != NULL) {
            PyObject *args[5] = {con, error, no_args, no_kwargs, Py_False};
            cursor = call_handling(error, s_cursor_failed, args,
                                   5 | PY_VECTORCALL_ARGUMENTS_OFFSET);
        }
        Py_XDECREF(error);
        Py_XDECREF(no_args);
        Py_XDECREF(no_kwargs);
        if (cursor == NULL) {
            Py_DECREF(kind);
            return NULL;
        }
    }
    PyObject *steady = kind->tp_alloc(kind, 0);
    if (steady == NULL) {
        Py_DECREF(kind);
        Py_DECREF(cursor);
        return NULL;
    }
    Py_INCREF(con);
    FIELD(steady, cur_con) = con;
    Py_INCREF(Py_False);
    FIELD(steady, cur_sized) = Py_False;
    /* kind._made_for, a class attribute (SteadyDBCursor's is None). */
    PyObject *made_for = _PyType_Lookup(kind, s_made_for); /* borrowed */
    Py_XINCREF(made_for);
    Py_DECREF(kind);
    if (made_for == NULL) {
        Py_DECREF(cursor);
        Py_DECREF(steady);
        PyErr_SetString(PyExc_AttributeError, "forksafe: cursor class without _made_for");
        return NULL;
    }
    if ((PyObject *)Py_TYPE(cursor) == made_for) {
        FIELD(steady, cur_cursor) = cursor; /* reference passed on */
        Py_INCREF(Py_False);
        FIELD(steady, cur_closed) = Py_False;
    }
    else {
        PyObject *args[3] = {steady, cursor, Py_True};
        PyObject *result =
            PyObject_VectorcallMethod(s_adopt, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(cursor);
        if (result == NULL) {
            Py_DECREF(made_for);
            Py_DECREF(steady);
            return NULL;
        }
        Py_DECREF(result);
    }
    Py_DECREF(made_for);
    return steady;
}

static PyObject *
connection_cursor(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (nargs == 0 && kwnames == NULL && Py_TYPE(self) == con_type) {
        PyObject *steady = plain_cursor(self);
        if (steady != NULL || PyErr_Occurred())
            return steady;
    }
    return fall_back(self, s_py_cursor, args, nargs, kwnames);
}

static PyObject *
proxy_cursor(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *con = FIELD(self, proxy_con);
    if (nargs == 0 && kwnames == NULL && con != NULL && Py_TYPE(con) == con_type) {
        Py_INCREF(con);
        PyObject *steady = plain_cursor(con);
        Py_DECREF(con);
        if (steady != NULL || PyErr_Occurred())
            return steady;
    }
    return fall_back(self, s_py_cursor, args, nargs, kwnames);
}

/* -- SteadyDBCursor ----------------------------------------------------------------- */

static PyObject *
stack_tuple(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *tuple = PyTuple_New(nargs);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(tuple, i, args[i]);
    }
    return tuple;
}

static PyObject *
stack_dict(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL || kwnames == NULL)
        return dict;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
        if (PyDict_SetItem(dict, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_DECREF(dict);
            return NULL;
        }
    }
    return dict;
}

/* The steady connection of a cursor, if the fast paths apply to it (borrowed). */
static PyObject *
cursor_con(PyObject *self)
{
    PyObject *con = FIELD(self, cur_con);
    if (con == NULL || Py_TYPE(con) != con_type || FIELD(self, cur_cursor) == NULL ||
        !token_armed(con))
        return NULL;
    return con;
}

static PyObject *
cursor_execute(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *con = cursor_con(self);
    if (con == NULL || FIELD(self, cur_sized) != Py_False || FIELD(con, con_plain) != Py_True)
        return fall_back(self, s_py_execute, args, nargs, kwnames);
    PyObject *driver = FIELD(self, cur_cursor);
    Py_INCREF(driver);
    Py_INCREF(con);
    PyObject *result = fall_back(driver, s_execute, args, nargs, kwnames);
    Py_DECREF(driver);
    if (result == NULL) {
        PyObject *failures = FIELD(con, con_failures);
        if (failures != NULL && PyErr_ExceptionMatches(failures)) {
            PyObject *error = take_error();
            PyObject *tuple = stack_tuple(args, nargs);
            PyObject *dict = stack_dict(args, nargs, kwnames);
            if (error != NULL && tuple != NULL && dict != NULL) {
                PyObject *call[4] = {self, error, tuple, dict};
                result = call_handling(error, s_execute_failed, call,
                                       4 | PY_VECTORCALL_ARGUMENTS_OFFSET);
            }
            Py_XDECREF(error);
            Py_XDECREF(tuple);
            Py_XDECREF(dict);
        }
    }
    Py_DECREF(con);
    return result;
}

static PyObject *
cursor_fetchone(PyObject *self, PyObject *Py_UNUSED(unused))
{
    if (cursor_con(self) == NULL)
        return call0(self, s_py_fetchone);
    PyObject *driver = FIELD(self, cur_cursor);
    Py_INCREF(driver);
    PyObject *row = call0(driver, s_fetchone);
    Py_DECREF(driver);
    return row;
}

static PyObject *
cursor_close(PyObject *self, PyObject *Py_UNUSED(unused))
{
    PyObject *closed = FIELD(self, cur_closed);
    if (closed == Py_True)
        Py_RETURN_NONE;
    if (closed != Py_False || cursor_con(self) == NULL)
        return call0(self, s_py_close);
    PyObject *driver = FIELD(self, cur_cursor);
    Py_INCREF(driver);
    Py_INCREF(Py_True);
    FIELD(self, cur_closed) = Py_True;
    Py_DECREF(Py_False); /* the old value */
    PyObject *result = call0(driver, s_close);
    Py_DECREF(driver);
    if (result == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyErr_Clear();
    }
    else {
        Py_DECREF(result);
    }
    Py_RETURN_NONE;
}

/* -- PooledDB.connection() ---------------------------------------------------------- */

/* -- Quiet: drivers' quiet probe of a PyMySQL connection ------------------------------ */

#ifdef HAVE_QUIET
/* Quiet(sock, fd)(con): whether ``con._sock`` is still ``sock`` and its descriptor has
 * nothing to read, as the closure drivers._pymysql_quiet() makes otherwise. The poll has
 * no timeout: it runs holding the GIL. */
typedef struct {
    PyObject_HEAD
    PyObject *sock;
    int fd;
} QuietObject;

static PyTypeObject QuietType;

/* 1 quiet, 0 not (or cannot tell), -1 an error set. */
static int
quiet_check(QuietObject *self, PyObject *con)
{
    PyObject *sock = PyObject_GetAttr(con, s_sock);
    if (sock == NULL)
        return -1;
    int same = sock == self->sock;
    Py_DECREF(sock);
    if (!same)
        return 0;
    struct pollfd watched = {self->fd, POLLIN | POLLPRI, 0};
    return poll(&watched, 1, 0) == 0;
}

static PyObject *
quiet_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    PyObject *con;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Quiet() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O:Quiet", &con))
        return NULL;
    int quiet = quiet_check((QuietObject *)self, con);
    return quiet < 0 ? NULL : PyBool_FromLong(quiet);
}

static PyObject *
quiet_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"sock", "fd", NULL};
    PyObject *sock;
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oi:Quiet", names, &sock, &fd))
        return NULL;
    if (fd < 0) {
        PyErr_Format(PyExc_ValueError, "Quiet: fd must be a file descriptor, got %d", fd);
        return NULL;
    }
    QuietObject *self = (QuietObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->sock = Py_NewRef(sock);
    self->fd = fd;
    return (PyObject *)self;
}

static void
quiet_dealloc(PyObject *self)
{
    Py_CLEAR(((QuietObject *)self)->sock);
    Py_TYPE(self)->tp_free(self);
}

static PyTypeObject QuietType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forksafe._speedups.Quiet",
    .tp_basicsize = sizeof(QuietObject),
    .tp_dealloc = quiet_dealloc,
    .tp_call = quiet_call,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Quiet(sock, fd)(con): con._sock is sock and fd has nothing to read.",
    .tp_new = quiet_new,
};
#endif

/* The ping of a checkout (the pool's inlined con._ping_check()); 0 or -1. */
static int
checkout_ping(PyObject *con)
{
    PyObject *flags = FIELD(con, con_ping);
    if (flags == NULL || !PyLong_Check(flags)) {
        PyErr_SetString(PyExc_AttributeError, "forksafe: _ping not set");
        return -1;
    }
    long ping = PyLong_AsLong(flags);
    if (ping == -1 && PyErr_Occurred())
        return -1;
    if (!(ping & 1))
        return 0;
    int plain_ping = truth(FIELD(con, con_plain_ping));
    if (plain_ping < 0)
        return -1;
    PyObject *driver_con = FIELD(con, con_con);
    if (!token_armed(con) || driver_con == NULL)
        return run0(con, s_ping_check);
    if (!plain_ping) {
        /* A quiet probe and no pinger (PyMySQL): a socket with nothing to read vouches
         * for the session, as in _ping_check(); else the driver's ping. */
        PyObject *quiet = FIELD(con, con_quiet);
        if (quiet == NULL || quiet == Py_None || FIELD(con, con_pinger) != Py_None)
            return run0(con, s_ping_check);
        Py_INCREF(quiet);
        Py_INCREF(driver_con);
        int calm;
#ifdef HAVE_QUIET
        if (Py_IS_TYPE(quiet, &QuietType)) {
            calm = quiet_check((QuietObject *)quiet, driver_con);
        }
        else
#endif
        {
            PyObject *answer = PyObject_CallOneArg(quiet, driver_con);
            calm = answer == NULL ? -1 : PyObject_IsTrue(answer);
            Py_XDECREF(answer);
        }
        Py_DECREF(quiet);
        Py_DECREF(driver_con);
        if (calm > 0)
            return 0;
        if (calm < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return -1;
            PyErr_Clear(); /* as _ping_check(): ask the server */
        }
        driver_con = FIELD(con, con_con);
        if (driver_con == NULL)
            return run0(con, s_ping_check);
    }
    Py_INCREF(driver_con);
    PyObject *alive = call1(driver_con, s_ping, Py_False);
    Py_DECREF(driver_con);
    if (alive == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyObject *error = take_error();
        if (error == NULL)
            return -1;
        PyObject *args[3] = {con, error, Py_True};
        PyObject *result =
            call_handling(error, s_ping_raised, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET);
        Py_DECREF(error);
        Py_XDECREF(result);
        return result == NULL ? -1 : 0;
    }
    int dead = 0;
    if (alive != Py_None) {
        int truthy = PyObject_IsTrue(alive);
        if (truthy < 0) {
            Py_DECREF(alive);
            return -1;
        }
        dead = !truthy;
    }
    Py_DECREF(alive);
    return dead ? run1(con, s_ping_dead, Py_True) : 0;
}

static PyObject *
pool_connection(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *slots = FIELD(self, pool_slots), *taken = FIELD(self, pool_taken);
    PyObject *idle = FIELD(self, pool_idle);
    PyObject *leaktime = FIELD(self, pool_leaktime);
    if (nargs || kwnames || !pool_pid_current(self) || FIELD(self, pool_warm) != Py_True ||
        truth(FIELD(self, pool_maxshared)) != 0 || slots == NULL || taken == NULL ||
        idle == NULL || FIELD(self, pool_recycling) == NULL || leaktime == NULL) {
        PyErr_Clear();
        return fall_back(self, s_py_connection, args, nargs, kwnames);
    }
    /* From here on, as connection() from its "else" on (no sharing). */
    Py_INCREF(slots);
    Py_INCREF(taken);
    Py_INCREF(idle);
    Py_INCREF(leaktime);
    PyObject *con = NULL, *proxy = NULL;
    if (slots != Py_None) {
        PyObject *token = call1(slots, s_get, Py_False);
        if (token == NULL) {
            if (!PyErr_ExceptionMatches(queue_empty))
                goto done;
            PyErr_Clear();
            if (run1(self, s_wait_for_token, slots) < 0)
                goto done;
        }
        else {
            Py_DECREF(token);
        }
    }
    if (count(taken) < 0)
        goto done;
    con = call0(idle, s_popleft);
    if (con == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_IndexError))
            goto done;
        PyErr_Clear();
        con = Py_NewRef(Py_None);
    }
    int fit = con == Py_None || Py_TYPE(con) != con_type;
    if (!fit) {
        int closed = truth(FIELD(con, con_closed));
        int recycle = truth(FIELD(self, pool_recycling)); /* read now, as connection() */
        if (closed < 0 || recycle < 0)
            goto ping_failed; /* a slot not set: as an AttributeError of the ping */
        fit = closed || recycle;
    }
    if (fit) {
        PyObject *ready = call1(self, s_fit, con);
        Py_SETREF(con, ready);
        if (con == NULL)
            goto done;
    }
    else if (checkout_ping(con) < 0) {
    ping_failed:;
        /* As ``except BaseException: self._drop_checkout(con); raise``. */
        PyObject *error = take_error();
        if (error == NULL)
            goto done;
        PyObject *call[2] = {self, con};
        PyObject *dropped =
            call_handling(error, s_drop_checkout, call, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET);
        if (dropped != NULL) {
            Py_DECREF(dropped);
            raise_again(error); /* reference passed on */
        }
        else {
            Py_DECREF(error);
        }
        goto done;
    }
    proxy = dedicated_type->tp_alloc(dedicated_type, 0);
    if (proxy == NULL)
        goto done;
    Py_INCREF(self);
    FIELD(proxy, proxy_pool) = self;
    FIELD(proxy, proxy_con) = con; /* reference passed on */
    con = NULL;
    if (leaktime != Py_None && run1(self, s_lease, proxy) < 0)
        Py_CLEAR(proxy); /* dropped: it gives its connection back */
done:
    Py_XDECREF(con);
    Py_DECREF(slots);
    Py_DECREF(taken);
    Py_DECREF(idle);
    Py_DECREF(leaktime);
    return proxy;
}

/* -- PooledDedicatedDBConnection.close() and __del__ --------------------------------- */

/* con._rollback() as the lean return calls it; 0 or -1. */
static int
lean_reset(PyObject *pool, PyObject *con)
{
    int flag = truth(FIELD(con, con_closed));
    if (flag != 0)
        return flag < 0 ? -1 : 0;
    flag = truth(FIELD(con, con_transaction));
    if (flag < 0)
        return -1;
    if (flag) {
        PyObject *error = call0(con, s_rollback_);
        if (error == NULL)
            return -1;
        int reconnected = error == Py_None ? 0 : truth(FIELD(con, con_reconnects));
        Py_DECREF(error);
        if (reconnected < 0)
            return -1;
        return reconnected ? run1(pool, s_count_reconnects, con) : 0;
    }
    flag = truth(FIELD(pool, pool_reset));
    if (flag <= 0)
        return flag;
    PyObject *probe = FIELD(con, con_in_transaction);
    PyObject *driver_con = FIELD(con, con_con);
    if (probe == NULL || driver_con == NULL) {
        PyErr_SetString(PyExc_AttributeError, "forksafe: connection slot not set");
        return -1;
    }
    Py_INCREF(driver_con);
    int open = 1;
    if (probe != Py_None) {
        Py_INCREF(probe);
        PyObject *state = callable_in_c(probe, Py_TYPE(driver_con))
                              ? call_c(probe, &driver_con, 1, NULL)
                              : PyObject_CallOneArg(probe, driver_con);
        Py_DECREF(probe);
        if (state == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(driver_con);
                return -1;
            }
            PyErr_Clear();
        }
        else {
            open = state == Py_None ? 1 : PyObject_IsTrue(state);
            Py_DECREF(state);
            if (open < 0) {
                /* A state whose truth raised: as the Python code, which raises it. */
                Py_DECREF(driver_con);
                return -1;
            }
        }
    }
    int status = 0;
    if (open) {
        PyObject *result = call0(driver_con, s_rollback);
        if (result != NULL) {
            Py_DECREF(result);
        }
        else if (!PyErr_ExceptionMatches(PyExc_Exception)) {
            status = -1;
        }
        else {
            PyObject *error = take_error();
            PyObject *call[2] = {con, error};
            PyObject *returned =
                error == NULL ? NULL
                              : call_handling(error, s_rollback_failed, call,
                                              2 | PY_VECTORCALL_ARGUMENTS_OFFSET);
            Py_XDECREF(error);
            if (returned == NULL) {
                status = -1;
            }
            else {
                Py_DECREF(returned);
                int reconnected = truth(FIELD(con, con_reconnects));
                if (reconnected < 0)
                    status = -1;
                else if (reconnected)
                    status = run1(pool, s_count_reconnects, con);
            }
        }
    }
    Py_DECREF(driver_con);
    return status;
}

static PyObject *
dedicated_close(PyObject *self, PyObject *Py_UNUSED(unused))
{
    PyObject *con = FIELD(self, proxy_con);
    if (con == Py_None)
        Py_RETURN_NONE;
    PyObject *pool = FIELD(self, proxy_pool);
    if (con == NULL || pool == NULL || Py_TYPE(con) != con_type ||
        !PyObject_TypeCheck(pool, pool_type) || FIELD(pool, pool_lean_return) != Py_True ||
        !token_armed(con) || truth(FIELD(con, con_reconnects)) != 0 ||
        FIELD(pool, pool_idle) == NULL || FIELD(pool, pool_given_back) == NULL ||
        FIELD(pool, pool_slots) == NULL) {
        PyErr_Clear();
        return call0(self, s_py_close);
    }
    /* pool.cache(con)'s common case, as the Python close() inlines it. */
    Py_INCREF(pool);
    Py_INCREF(Py_None);
    FIELD(self, proxy_con) = Py_None; /* the reference to con passes to this function */
    PyObject *result = NULL;
    if (lean_reset(pool, con) < 0)
        goto done;
    int closed = truth(FIELD(con, con_closed));
    if (closed < 0)
        goto done;
    if (!closed) {
        PyObject *idle = FIELD(pool, pool_idle);
        if (idle == NULL)
            goto done;
        Py_INCREF(idle);
        int status = run1(idle, s_append, con);
        Py_DECREF(idle);
        if (status < 0)
            goto done;
    }
    PyObject *given_back = FIELD(pool, pool_given_back);
    if (given_back == NULL || count(given_back) < 0)
        goto done;
    PyObject *slots = FIELD(pool, pool_slots);
    if (slots != NULL && slots != Py_None) {
        Py_INCREF(slots);
        int status = run1(slots, s_put, Py_True);
        Py_DECREF(slots);
        if (status < 0)
            goto done;
    }
    result = Py_NewRef(Py_None);
done:
    if (result == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_AttributeError, "forksafe: pool slot not set");
    Py_DECREF(con);
    Py_DECREF(pool);
    return result;
}

static PyObject *
dedicated_del(PyObject *self, PyObject *Py_UNUSED(unused))
{
    if (FIELD(self, proxy_con) == Py_None)
        Py_RETURN_NONE;
    return call0(self, s_py_del); /* also when _con is unset: its AttributeError is reported */
}

/* The finaliser of a dedicated proxy: __del__ without looking it up, nothing to do once
 * closed. Errors are reported as unraisable, as for any __del__. */
static void
dedicated_finalize(PyObject *self)
{
    if (FIELD(self, proxy_con) == Py_None)
        return;
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *result = call0(self, s_py_del);
    if (result == NULL)
        PyErr_WriteUnraisable(self);
    else
        Py_DECREF(result);
    PyErr_Restore(type, value, traceback);
}

/* -- install() ---------------------------------------------------------------------- */

static PyMethodDef connection_def = {"connection", (PyCFunction)(void (*)(void))pool_connection,
                                     METH_FASTCALL | METH_KEYWORDS, NULL};
static PyMethodDef proxy_cursor_def = {"cursor", (PyCFunction)(void (*)(void))proxy_cursor,
                                       METH_FASTCALL | METH_KEYWORDS, NULL};
static PyMethodDef con_cursor_def = {"cursor", (PyCFunction)(void (*)(void))connection_cursor,
                                     METH_FASTCALL | METH_KEYWORDS, NULL};
static PyMethodDef close_def = {"close", dedicated_close, METH_NOARGS, NULL};
static PyMethodDef del_def = {"__del__", dedicated_del, METH_NOARGS, NULL};
static PyMethodDef execute_def = {"execute", (PyCFunction)(void (*)(void))cursor_execute,
                                  METH_FASTCALL | METH_KEYWORDS, NULL};
static PyMethodDef fetchone_def = {"fetchone", cursor_fetchone, METH_NOARGS, NULL};
static PyMethodDef cursor_close_def = {"close", cursor_close, METH_NOARGS, NULL};

/* The offset of slot ``name`` of ``type`` (a member descriptor of its own), or -1. */
static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name); /* borrowed */
    if (descr == NULL || Py_TYPE(descr) != &PyMemberDescr_Type ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "forksafe: %s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    return ((PyMemberDescrObject *)descr)->d_member->offset;
}

/* Put a C method ``def`` on ``type``, its docstring taken from the Python method. */
static int
set_method(PyTypeObject *type, PyMethodDef *def)
{
    PyObject *python = PyDict_GetItemString(type->tp_dict, def->ml_name); /* borrowed */
    if (python != NULL) {
        PyObject *doc = PyObject_GetAttrString(python, "__doc__");
        if (doc == NULL)
            return -1;
        if (PyUnicode_Check(doc)) {
            const char *text = PyUnicode_AsUTF8(doc);
            char *copy = text == NULL ? NULL : PyMem_Malloc(strlen(text) + 1);
            if (copy == NULL) {
                Py_DECREF(doc);
                if (!PyErr_Occurred())
                    PyErr_NoMemory();
                return -1;
            }
            def->ml_doc = strcpy(copy, text); /* for the life of the process */
        }
        Py_DECREF(doc);
    }
    PyObject *descr = PyDescr_NewMethod(type, def);
    if (descr == NULL)
        return -1;
    int status = PyObject_SetAttrString((PyObject *)type, def->ml_name, descr);
    Py_DECREF(descr);
    return status;
}

static int
take_type(PyObject *arg, PyTypeObject **slot)
{
    if (!PyType_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "forksafe: install() takes classes");
        return -1;
    }
    Py_INCREF(arg);
    *slot = (PyTypeObject *)arg;
    return 0;
}

#define OFFSET(var, type, name)                   \
    if ((var = slot_offset(type, name)) < 0)      \
        return NULL;

static PyObject *
install(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *pool, *proxy, *dedicated, *con, *cursor, *page, *armed, *fork, *empty;
    if (pool_type != NULL) {
        /* Another interpreter of this process (the state here is per process). */
        PyErr_SetString(PyExc_ImportError,
                        "forksafe: the C hot paths serve one interpreter per process");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOO:install", &pool, &proxy, &dedicated, &con, &cursor,
                          &page, &armed, &fork, &empty))
        return NULL;
    if (take_type(pool, &pool_type) < 0 || take_type(proxy, &proxy_type) < 0 ||
        take_type(dedicated, &dedicated_type) < 0 || take_type(con, &con_type) < 0 ||
        take_type(cursor, &cursor_type) < 0)
        return NULL;
    OFFSET(pool_pid, pool_type, "_pid");
    OFFSET(pool_warm, pool_type, "_warm");
    OFFSET(pool_maxshared, pool_type, "_maxshared");
    OFFSET(pool_slots, pool_type, "_slots");
    OFFSET(pool_taken, pool_type, "_taken");
    OFFSET(pool_idle, pool_type, "_idle");
    OFFSET(pool_recycling, pool_type, "_recycling");
    OFFSET(pool_leaktime, pool_type, "_leaktime");
    OFFSET(pool_lean_return, pool_type, "_lean_return");
    OFFSET(pool_reset, pool_type, "_reset");
    OFFSET(pool_given_back, pool_type, "_given_back");
    OFFSET(proxy_pool, proxy_type, "_pool");
    OFFSET(proxy_con, proxy_type, "_con");
    OFFSET(con_con, con_type, "_con");
    OFFSET(con_closed, con_type, "_closed");
    OFFSET(con_token, con_type, "_token");
    OFFSET(con_plain, con_type, "_plain");
    OFFSET(con_plain_ping, con_type, "_plain_ping");
    OFFSET(con_ping, con_type, "_ping");
    OFFSET(con_transaction, con_type, "_transaction");
    OFFSET(con_reconnects, con_type, "_reconnects");
    OFFSET(con_in_transaction, con_type, "_in_transaction");
    OFFSET(con_failures, con_type, "_failures");
    OFFSET(con_cursor_class, con_type, "_cursor_class");
    OFFSET(con_pinger, con_type, "_pinger");
    OFFSET(con_quiet, con_type, "_quiet");
    OFFSET(cur_con, cursor_type, "_con");
    OFFSET(cur_cursor, cursor_type, "_cursor");
    OFFSET(cur_closed, cursor_type, "_closed");
    OFFSET(cur_sized, cursor_type, "_sized");
    if (!PyType_IsSubtype(dedicated_type, proxy_type)) {
        PyErr_SetString(PyExc_TypeError, "forksafe: the dedicated proxy is not a proxy");
        return NULL;
    }
    if (PyObject_GetBuffer(page, &page_view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(armed, &armed_view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (page_view.len < 1 || armed_view.len < 1) {
        PyErr_SetString(PyExc_ValueError, "forksafe: empty page");
        return NULL;
    }
    fork_dict = PyModule_GetDict(fork); /* borrowed from the module, kept alive below */
    if (fork_dict == NULL)
        return NULL;
    Py_INCREF(fork);
    Py_INCREF(fork_dict);
    queue_empty = Py_NewRef(empty);
    if (set_method(pool_type, &connection_def) < 0 || set_method(proxy_type, &proxy_cursor_def) < 0 ||
        set_method(con_type, &con_cursor_def) < 0 || set_method(dedicated_type, &close_def) < 0 ||
        set_method(dedicated_type, &del_def) < 0 || set_method(cursor_type, &execute_def) < 0 ||
        set_method(cursor_type, &fetchone_def) < 0 || set_method(cursor_type, &cursor_close_def) < 0)
        return NULL;
    dedicated_type->tp_finalize = dedicated_finalize; /* set after __del__, which sets it */
    for (int i = 0; i < 256; i++) {
        if ((armed_int[i] = PyLong_FromLong(i)) == NULL)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"install", install, METH_VARARGS,
     "install(PooledDB, proxy, dedicated proxy, SteadyDBConnection, SteadyDBCursor, page,"
     " armed, fork module, queue.Empty): put the C methods on the classes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "forksafe._speedups", "C versions of the pools' hot paths.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text)                                     \
    if ((var = PyUnicode_InternFromString(text)) == NULL)     \
        return NULL;

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(s_cached_pid, "cached_pid");
    INTERN(s_get, "get");
    INTERN(s_put, "put");
    INTERN(s_popleft, "popleft");
    INTERN(s_append, "append");
    INTERN(s_cursor, "cursor");
    INTERN(s_execute, "execute");
    INTERN(s_fetchone, "fetchone");
    INTERN(s_close, "close");
    INTERN(s_rollback, "rollback");
    INTERN(s_rollback_, "_rollback");
    INTERN(s_rollback_failed, "_rollback_failed");
    INTERN(s_ping, "ping");
    INTERN(s_made_for, "_made_for");
    INTERN(s_adopt, "_adopt");
    INTERN(s_cursor_failed, "_cursor_failed");
    INTERN(s_execute_failed, "_execute_failed");
    INTERN(s_wait_for_token, "_wait_for_token");
    INTERN(s_fit, "_fit");
    INTERN(s_ping_raised, "_ping_raised");
    INTERN(s_ping_dead, "_ping_dead");
    INTERN(s_ping_check, "_ping_check");
    INTERN(s_drop_checkout, "_drop_checkout");
    INTERN(s_lease, "_lease");
    INTERN(s_count_reconnects, "_count_reconnects");
    INTERN(s_py_connection, "_py_connection");
    INTERN(s_py_cursor, "_py_cursor");
    INTERN(s_py_close, "_py_close");
    INTERN(s_py_del, "_py___del__");
    INTERN(s_py_execute, "_py_execute");
    INTERN(s_py_fetchone, "_py_fetchone");
    INTERN(s_sock, "_sock");
    PyObject *module = PyModule_Create(&module_def);
#ifdef HAVE_QUIET
    if (module != NULL &&
        (PyType_Ready(&QuietType) < 0 || PyModule_AddObjectRef(module, "Quiet", (PyObject *)&QuietType) < 0))
        Py_CLEAR(module);
#endif
    return module;
}
