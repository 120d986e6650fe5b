/* The compiled reader of a usual TEXT load report (optional; see lbclient/reports.py).

   read_text(header, at, report_type, empty) reads ``TEXT name=value, name=value, ...`` of the
   usual shape into a report_type (a tuple subclass of nine places, LoadReport's order), or
   returns None for anything else, which the caller then reads with the pure-Python careful
   reading. It accepts a subset of what that reading accepts and gives, for each header it
   accepts, the same report: the same doubles (CPython's own string-to-double conversion, the one
   float() uses), the named metrics in the header's order.

   The usual shape, as the pure-Python quick reading has it, narrowed: ``header`` an exact str,
   ASCII, at most MAX_LENGTH characters, starting with "TEXT "; items separated by ", "; each
   item a name, "=", a value; every value digits with an optional fraction and exponent (no sign,
   no space, no underscore, no letters but the exponent's e), read within 0..MAX_VALUE; every
   name an ORCA field or "named_metrics.<key>" (a key not empty, without a comma, not ending in a
   space or control character), each given once; at most MAX_NAMED named metrics.

   What may not: I/O, a clock, anything but reading one header. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_LENGTH 8192
#define MAX_NAMED 64
#define MAX_VALUE 1e9
/* The longest value read here; a longer one (still a number, perhaps) is left to Python. */
#define MAX_DIGITS 63

#ifndef LBCLIENT_SOURCE_SHA256
#define LBCLIENT_SOURCE_SHA256 ""
#endif

static const char NAMED_PREFIX[] = "named_metrics.";
#define NAMED_PREFIX_LENGTH ((Py_ssize_t)(sizeof(NAMED_PREFIX) - 1))

/* The place of an ORCA field in the report (at is at 0), or 0 for a name that is not one. */
static int
field_place(const char *name, Py_ssize_t length)
{
    switch (length) {
    case 3:
        return memcmp(name, "eps", 3) == 0 ? 5 : 0;
    case 14:
        return memcmp(name, "rps_fractional", 14) == 0 ? 4 : 0;
    case 15:
        if (memcmp(name, "cpu_utilization", 15) == 0) {
            return 1;
        }
        return memcmp(name, "mem_utilization", 15) == 0 ? 2 : 0;
    case 23:
        return memcmp(name, "application_utilization", 23) == 0 ? 3 : 0;
    default:
        return 0;
    }
}

/* Whether text[0:length] is digits with an optional fraction and exponent, wholly. */
static int
plain_number(const char *text, Py_ssize_t length)
{
    Py_ssize_t at = 0;
    Py_ssize_t digits = 0;
    while (at < length && text[at] >= '0' && text[at] <= '9') {
        at++;
        digits++;
    }
    if (at < length && text[at] == '.') {
        at++;
        while (at < length && text[at] >= '0' && text[at] <= '9') {
            at++;
            digits++;
        }
    }
    if (digits == 0) {
        return 0;
    }
    if (at < length && (text[at] == 'e' || text[at] == 'E')) {
        at++;
        if (at < length && (text[at] == '+' || text[at] == '-')) {
            at++;
        }
        if (at == length || text[at] < '0' || text[at] > '9') {
            return 0;
        }
        while (at < length && text[at] >= '0' && text[at] <= '9') {
            at++;
        }
    }
    return at == length;
}

/* text[0:length] (a plain number) as a double in *number: 1, or 0 where it is not read here
   (too long, out of range). */
static int
read_number(const char *text, Py_ssize_t length, double *number)
{
    char copy[MAX_DIGITS + 1];
    char *end = NULL;
    double value;
    if (length > MAX_DIGITS || !plain_number(text, length)) {
        return 0;
    }
    memcpy(copy, text, (size_t)length);
    copy[length] = '\0';
    /* No overflow exception: an overflow gives an infinity, refused below like any too large. */
    value = PyOS_string_to_double(copy, &end, NULL);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (end != copy + length || !(value >= 0.0 && value <= MAX_VALUE)) {
        return 0;
    }
    *number = value;
    return 1;
}

/* A named metric's key (what follows the prefix) if name[0:length] names one, else 0. */
static int
named_key(const char *name, Py_ssize_t length)
{
    return length > NAMED_PREFIX_LENGTH
        && memcmp(name, NAMED_PREFIX, (size_t)NAMED_PREFIX_LENGTH) == 0
        && (unsigned char)name[length - 1] > ' '
        && memchr(name, ',', (size_t)length) == NULL;
}

static PyObject *
ascii_string(const char *text, Py_ssize_t length)
{
    PyObject *string = PyUnicode_New(length, 127);
    if (string != NULL) {
        memcpy(PyUnicode_1BYTE_DATA(string), text, (size_t)length);
    }
    return string;
}

/* The fields read so far; NULL where not given. */
typedef struct {
    PyObject *places[6]; /* 1..5: ORCA's fields; 0 unused */
    PyObject *named;     /* a dict, or NULL before the first named metric */
} reading;

static void
reading_clear(reading *read)
{
    int place;
    for (place = 0; place < 6; place++) {
        Py_CLEAR(read->places[place]);
    }
    Py_CLEAR(read->named);
}

/* Reads one item into *read: 1 read, 0 not the usual shape, -1 an error (set). */
static int
read_item(const char *item, Py_ssize_t length, reading *read)
{
    const char *equals = memchr(item, '=', (size_t)length);
    Py_ssize_t name_length;
    double number;
    int place;
    PyObject *value;
    PyObject *key;
    int known;
    if (equals == NULL) {
        return 0;
    }
    name_length = equals - item;
    if (!read_number(equals + 1, length - name_length - 1, &number)) {
        return 0;
    }
    place = field_place(item, name_length);
    if (place != 0) {
        if (read->places[place] != NULL) {
            return 0; /* given twice */
        }
        read->places[place] = PyFloat_FromDouble(number);
        return read->places[place] == NULL ? -1 : 1;
    }
    if (!named_key(item, name_length)) {
        return 0;
    }
    if (read->named == NULL) {
        read->named = PyDict_New();
        if (read->named == NULL) {
            return -1;
        }
    }
    key = ascii_string(item + NAMED_PREFIX_LENGTH, name_length - NAMED_PREFIX_LENGTH);
    if (key == NULL) {
        return -1;
    }
    known = PyDict_Contains(read->named, key);
    if (known != 0) {
        Py_DECREF(key);
        return known < 0 ? -1 : 0; /* given twice, or an error */
    }
    value = PyFloat_FromDouble(number);
    if (value == NULL) {
        Py_DECREF(key);
        return -1;
    }
    known = PyDict_SetItem(read->named, key, value);
    Py_DECREF(key);
    Py_DECREF(value);
    return known < 0 ? -1 : 1;
}

/* The keys of the two named metrics with a place of their own (interned when the module is
   made). */
static PyObject *RIF_KEY = NULL;
static PyObject *LATENCY_KEY = NULL;

/* A new reference to the named metric ``key`` of ``named``, or to None. */
static PyObject *
named_value(PyObject *named, PyObject *key)
{
    PyObject *value = PyDict_GetItemWithError(named, key); /* borrowed; str keys: no error */
    if (value == NULL) {
        value = Py_None;
    }
    Py_INCREF(value);
    return value;
}

static PyObject *
made_report(PyTypeObject *report_type, PyObject *at, PyObject *empty, reading *read)
{
    PyObject *report;
    PyObject *rif = Py_None;
    PyObject *latency = Py_None;
    PyObject *named = empty;
    int place;
    if (read->named != NULL) {
        PyObject *latency_ms;
        if (PyDict_GET_SIZE(read->named) > MAX_NAMED) {
            Py_RETURN_NONE;
        }
        named = PyDictProxy_New(read->named);
        if (named == NULL) {
            return NULL;
        }
        rif = named_value(read->named, RIF_KEY);
        latency_ms = PyDict_GetItemWithError(read->named, LATENCY_KEY);
        if (latency_ms == NULL) {
            Py_INCREF(Py_None);
        } else {
            latency = PyFloat_FromDouble(PyFloat_AS_DOUBLE(latency_ms) / 1000.0);
            if (latency == NULL) {
                Py_DECREF(named);
                Py_DECREF(rif);
                return NULL;
            }
        }
    } else {
        Py_INCREF(named);
        Py_INCREF(Py_None);
        Py_INCREF(Py_None);
    }
    report = report_type->tp_alloc(report_type, 9);
    if (report == NULL) {
        Py_DECREF(named);
        Py_DECREF(rif);
        Py_DECREF(latency);
        return NULL;
    }
    Py_INCREF(at);
    PyTuple_SET_ITEM(report, 0, at);
    for (place = 1; place <= 5; place++) {
        PyObject *value = read->places[place];
        if (value == NULL) {
            value = Py_None;
            Py_INCREF(value);
        } else {
            read->places[place] = NULL; /* the report takes the reference */
        }
        PyTuple_SET_ITEM(report, place, value);
    }
    PyTuple_SET_ITEM(report, 6, named);
    PyTuple_SET_ITEM(report, 7, rif);
    PyTuple_SET_ITEM(report, 8, latency);
    return report;
}

static PyObject *
read_text(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *header;
    PyTypeObject *report_type;
    const char *text;
    Py_ssize_t length;
    Py_ssize_t start;
    reading read = {{NULL, NULL, NULL, NULL, NULL, NULL}, NULL};
    PyObject *report;
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "read_text takes 4 arguments, got %zd", nargs);
        return NULL;
    }
    header = args[0];
    if (!PyType_Check(args[2])
        || !PyType_IsSubtype((PyTypeObject *)args[2], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "read_text: report_type must be a tuple subclass");
        return NULL;
    }
    report_type = (PyTypeObject *)args[2];
    if (!PyUnicode_CheckExact(header) || !PyUnicode_IS_ASCII(header)) {
        Py_RETURN_NONE;
    }
    length = PyUnicode_GET_LENGTH(header);
    text = (const char *)PyUnicode_1BYTE_DATA(header);
    if (length > MAX_LENGTH || length < 5 || memcmp(text, "TEXT ", 5) != 0) {
        Py_RETURN_NONE;
    }
    start = 5;
    for (;;) {
        /* The item runs to the next ", " (a comma alone is part of it) or to the end. */
        Py_ssize_t end = start;
        int outcome;
        while (end < length && !(text[end] == ',' && end + 1 < length && text[end + 1] == ' ')) {
            end++;
        }
        outcome = read_item(text + start, end - start, &read);
        if (outcome <= 0) {
            reading_clear(&read);
            if (outcome < 0) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (end == length) {
            break;
        }
        start = end + 2;
    }
    report = made_report(report_type, args[1], args[3], &read);
    reading_clear(&read);
    return report;
}

static PyMethodDef methods[] = {
    {"read_text", (PyCFunction)(void (*)(void))read_text, METH_FASTCALL,
     "read_text(header, at, report_type, empty): the report of a usual TEXT header, or None."},
    {NULL, NULL, 0, NULL},
};

static int
module_exec(PyObject *module)
{
    PyObject *max_value;
    int failed;
    if (RIF_KEY == NULL) {
        RIF_KEY = PyUnicode_InternFromString("rif");
        LATENCY_KEY = PyUnicode_InternFromString("latency_ms");
        if (RIF_KEY == NULL || LATENCY_KEY == NULL) {
            Py_CLEAR(RIF_KEY);
            Py_CLEAR(LATENCY_KEY);
            return -1;
        }
    }
    max_value = PyFloat_FromDouble(MAX_VALUE);
    if (max_value == NULL) {
        return -1;
    }
    failed = PyModule_AddObjectRef(module, "MAX_VALUE", max_value) < 0;
    Py_DECREF(max_value);
    if (failed
        || PyModule_AddIntConstant(module, "MAX_LENGTH", MAX_LENGTH) < 0
        || PyModule_AddIntConstant(module, "MAX_NAMED", MAX_NAMED) < 0
        || PyModule_AddStringConstant(module, "SOURCE_SHA256", LBCLIENT_SOURCE_SHA256) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
#ifdef Py_mod_gil
    /* Free-threaded builds: it keeps no state but the two keys made once as it is imported. */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef definition = {
    PyModuleDef_HEAD_INIT,
    "lbclient._textreport",
    "The compiled reader of a usual TEXT load report (see lbclient.reports).",
    0,
    methods,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__textreport(void)
{
    return PyModuleDef_Init(&definition);
}
