/* The compiled per-request path of the server companion (optional; see lbclient/server/_asgi.py).

   Counter: what a LoadTracker counts per request. Its requests in flight (what the pure-Python
   tracker keeps as a list of one entry per request: len, append and pop are the same here),
   and, once the tracker shares its count with the server's other processes, this process's
   word of the shared file, written as the count changes, and the other live processes' words,
   added up as the Python Shared does (its list of them taken from Shared each time the file's
   generation moves or its check falls due). And each request's end, counted as it comes: its
   latency in the ring of the requests its arrival found in flight, it and its error in the
   bucket of the second it ended in; the tracker asks for the latencies and rates it reports
   (samples, rates). The rules are the pure-Python tracker's (_fold, _turn, _estimate, _rates),
   each written here again, and tested against it.

   Gate: what LoadReportingASGI does per HTTP request, up to calling the app: tells the requests
   that take the usual path (an "http" scope of a joined tracker, not the probe path, headers a
   list of pairs) from the rest (None: the caller takes its pure-Python path), reads the format
   a request asks its report in, and counts the arrival. It returns the Reply, the `send` the app
   gets: it keeps the response's status and adds the report to the start of a response that
   asked; its end() and drop() count how the request ended.

   Middleware and Call: LoadReportingASGI's base and what calling it makes, an awaitable
   driven as the middleware's `async def` would be, without a Python frame: at its first step
   it asks the Gate, awaits the app with the Reply, and ends or drops the request as the app
   returns or raises; any other request goes to the middleware's Python path.

   Every rule here is the pure-Python path's, which stays the reference (tests run both on the
   same requests). It relies on the interpreter lock: a free-threaded build keeps the Python path.
   What may not: I/O, the report's text (the tracker renders it), a rule of its own. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <time.h>

#ifndef LBCLIENT_SOURCE_SHA256
#define LBCLIENT_SOURCE_SHA256 ""
#endif

/* The largest count one slot may add (as lbclient.server._shared.MOST_PER_SLOT). */
#define MOST_PER_SLOT (1 << 20)
/* Where the file's generation is (as _shared._GENERATION). */
#define GENERATION_WORD 1
/* The header a request asks for its report with, and the one the report goes in. */
static const char ASKING[] = "endpoint-load-metrics-format";
#define ASKING_LENGTH ((Py_ssize_t)(sizeof(ASKING) - 1))
static const char REPORT[] = "endpoint-load-metrics";
#define REPORT_LENGTH ((Py_ssize_t)(sizeof(REPORT) - 1))

static const char START_TEXT[] = "http.response.start";
#define START_LENGTH ((Py_ssize_t)(sizeof(START_TEXT) - 1))

static PyObject *EMPTY, *FIVE_HUNDRED; /* (), 500 */
static PyObject *KEY_TYPE, *KEY_STATUS, *KEY_HEADERS, *KEY_PATH, *HTTP, *START, *TEXT, *JSON,
    *JOINED, *ENCODED, *ENCODED_AT, *REPORT_NAME;

/* ---- Counter ---------------------------------------------------------------------------- */

/* The latest `window` latencies of the requests that found one number in flight, and when the
   newest came (never: minus infinity). */
typedef struct {
    double *samples;
    Py_ssize_t count; /* kept, up to the window */
    Py_ssize_t next;  /* where the next goes once the ring is full */
    double last;
} Ring;

typedef struct {
    PyObject_HEAD
    Py_ssize_t flying;
    PyObject *clock; /* NULL: CLOCK_MONOTONIC, as time.monotonic reads it on Linux */
    int has_clock;   /* a clock was given (it is gone once the GC cleared the counter) */
    /* Latencies, by the requests each arrival found in flight (0..max_found). */
    Py_ssize_t window;
    Py_ssize_t max_found;
    double found_age;
    Ring *rings;
    double *store;
    /* Requests and errors per whole second since origin, in a ring of rate_window buckets;
       ends count in bucket `slot` until the clock reaches `until`. */
    Py_ssize_t rate_window;
    long long *seconds, *requests, *errors;
    Py_ssize_t slot;
    double origin, until;
    /* Shared: the file's words while this process holds its slot. */
    int shared;
    Py_buffer words;
    Py_ssize_t own;   /* the word of this process's count */
    PyObject *check;  /* check(now) -> (generation, next check, the others' words, most) */
    long long generation;
    double next_check;
    Py_ssize_t *others;
    Py_ssize_t other_count;
    long long most;
} Counter;

static double
monotonic_now(void)
{
    /* time.monotonic's value: the nanoseconds of CLOCK_MONOTONIC as seconds, rounded alike. */
    struct timespec now;
    int64_t ns;
    clock_gettime(CLOCK_MONOTONIC, &now);
    ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    if (ns % 1000000000 == 0) {
        return (double)(ns / 1000000000);
    }
    return (double)ns / 1e9;
}

/* The largest windows counted here (a tracker with larger ones counts in Python). */
#define MOST_WINDOW 1024
#define MOST_RATE_WINDOW 65536
#define MOST_FOUND 4096

/* The most seconds a clock value may lie from the counter's origin: whole seconds and their
   buckets stay exact in a double and a 64-bit integer (about 285 million years). */
#define MOST_SECONDS 9007199254740992.0

/* The clock's value into *now; -1 with an exception set where the clock failed, or gave a value
   that is not a finite number within MOST_SECONDS of the origin. */
static int
read_clock(Counter *self, double *now)
{
    PyObject *value;
    if (self->clock == NULL) {
        if (self->has_clock) {
            PyErr_SetString(PyExc_RuntimeError, "the Counter was cleared");
            return -1;
        }
        *now = monotonic_now();
        return 0;
    }
    value = PyObject_CallNoArgs(self->clock);
    if (value == NULL) {
        return -1;
    }
    *now = PyFloat_AsDouble(value);
    if (*now == -1.0 && PyErr_Occurred()) {
        Py_DECREF(value);
        return -1;
    }
    if (!isfinite(*now) || fabs(*now - self->origin) >= MOST_SECONDS) {
        PyErr_Format(PyExc_ValueError,
                     "the clock returned %R: not a finite number of seconds near the others",
                     value);
        Py_DECREF(value);
        return -1;
    }
    Py_DECREF(value);
    return 0;
}

/* `now`, checked as read_clock checks a clock's value (for the times Python passes in). */
static int
check_time(Counter *self, double now)
{
    char text[64];
    if (!isfinite(now) || fabs(now - self->origin) >= MOST_SECONDS) {
        PyOS_snprintf(text, sizeof(text), "%.17g", now);
        PyErr_Format(PyExc_ValueError, "%s is not a finite number of seconds near the others",
                     text);
        return -1;
    }
    return 0;
}

static void
stop_sharing(Counter *self)
{
    if (self->shared) {
        self->shared = 0;
        PyBuffer_Release(&self->words);
    }
    PyMem_Free(self->others);
    self->others = NULL;
    self->other_count = 0;
    Py_CLEAR(self->check);
}

static int64_t *
words_of(Counter *self)
{
    return (int64_t *)self->words.buf;
}

static void
publish(Counter *self)
{
    if (self->shared) {
        words_of(self)[self->own] = (int64_t)self->flying;
    }
}

/* Takes the others' words from Shared's check; -1 with an exception set where it failed. */
static int
recheck(Counter *self, double now)
{
    PyObject *checked, *places;
    Py_ssize_t count, index, *others, length;
    long long generation, most;
    double next_check;
    checked = PyObject_CallFunction(self->check, "d", now);
    if (checked == NULL) {
        return -1;
    }
    if (!PyArg_ParseTuple(checked, "LdO!L", &generation, &next_check, &PyTuple_Type, &places,
                          &most)) {
        Py_DECREF(checked);
        return -1;
    }
    if (!self->shared) { /* the check gave the slot back meanwhile */
        Py_DECREF(checked);
        return 0;
    }
    length = self->words.len / 8;
    count = PyTuple_GET_SIZE(places);
    others = PyMem_New(Py_ssize_t, count > 0 ? count : 1);
    if (others == NULL) {
        Py_DECREF(checked);
        PyErr_NoMemory();
        return -1;
    }
    for (index = 0; index < count; index++) {
        Py_ssize_t place = PyLong_AsSsize_t(PyTuple_GET_ITEM(places, index));
        if (place == -1 && PyErr_Occurred()) {
            PyMem_Free(others);
            Py_DECREF(checked);
            return -1;
        }
        if (place < 0 || place >= length) {
            PyMem_Free(others);
            Py_DECREF(checked);
            PyErr_Format(PyExc_ValueError, "word %zd is not in the shared file", place);
            return -1;
        }
        others[index] = place;
    }
    Py_DECREF(checked);
    PyMem_Free(self->others);
    self->others = others;
    self->other_count = count;
    self->generation = generation;
    self->next_check = next_check;
    self->most = most;
    return 0;
}

#ifdef __SIZEOF_INT128__
typedef __int128 wide_sum; /* the exact sum of up to SLOTS 64-bit words, as Python's */
#else
typedef long double wide_sum; /* exact where 64 bits of mantissa are; else near enough */
#endif

/* The other live processes' requests in flight, as Shared.others counts them, into *count: 0
   where the count is not shared. A check that raised an Exception is reported as unraisable
   (not to the request) and tried again a second later, the others counted as last checked;
   -1 with the exception set for anything else (KeyboardInterrupt, SystemExit). */
static int
others_in_flight(Counter *self, double now, Py_ssize_t *count)
{
    int64_t *words;
    wide_sum total = 0;
    Py_ssize_t index;
    *count = 0;
    if (!self->shared) {
        return 0;
    }
    words = words_of(self);
    if (words[GENERATION_WORD] != self->generation || now >= self->next_check) {
        if (recheck(self, now) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                return -1;
            }
            PyErr_WriteUnraisable((PyObject *)self);
            if (self->shared) {
                self->generation = words_of(self)[GENERATION_WORD];
                self->next_check = now + 1.0;
            }
        }
        if (!self->shared) { /* the check gave the slot back meanwhile */
            return 0;
        }
        words = words_of(self);
    }
    for (index = 0; index < self->other_count; index++) {
        total += words[self->others[index]];
    }
    if (0 <= total && total <= (wide_sum)self->most) {
        *count = (Py_ssize_t)total;
        return 0;
    }
    total = 0; /* a slot not believed: the others, each checked */
    for (index = 0; index < self->other_count; index++) {
        int64_t one = words[self->others[index]];
        if (0 < one && one <= MOST_PER_SLOT) {
            total += one;
        }
    }
    *count = (Py_ssize_t)total;
    return 0;
}

/* A request arrived: counted in flight; its time and the requests it found (-1: the clock
   failed, nothing counted, an exception set). */
static int
arrive(Counter *self, double *now, Py_ssize_t *found)
{
    Py_ssize_t others;
    if (read_clock(self, now) < 0) {
        return -1;
    }
    *found = self->flying;
    self->flying++;
    publish(self);
    if (others_in_flight(self, *now, &others) < 0) {
        if (self->flying > 0) {
            self->flying--;
        }
        publish(self);
        return -1;
    }
    *found += others;
    return 0;
}

static void
leave_flight(Counter *self)
{
    if (self->flying > 0) {
        self->flying--;
    }
    publish(self);
}

/* Counting in the bucket of the second `now` is in (a bucket last used for an older second
   starts from 0): _turn. */
static void
turn(Counter *self, double now)
{
    long long second = (long long)floor(now - self->origin);
    Py_ssize_t slot = (Py_ssize_t)(((second % self->rate_window) + self->rate_window)
                                   % self->rate_window);
    if (self->seconds[slot] != second) {
        self->seconds[slot] = second;
        self->requests[slot] = 0;
        self->errors[slot] = 0;
    }
    self->slot = slot;
    self->until = self->origin + (double)second + 1.0;
}

/* One request ended at `now`: _fold's count of one entry. */
static void
count_end(Counter *self, double started, Py_ssize_t found, double now, int error)
{
    double latency = now - started;
    Ring *ring;
    if (latency < 0.0) {
        latency = 0.0;
    }
    if (found < 0) {
        found = 0;
    }
    else if (found > self->max_found) {
        found = self->max_found;
    }
    ring = &self->rings[found];
    if (now - ring->last > self->found_age) { /* what it kept is old: it starts afresh */
        ring->count = 0;
        ring->next = 0;
    }
    if (ring->count < self->window) {
        ring->samples[ring->count++] = latency;
    }
    else {
        ring->samples[ring->next] = latency;
        ring->next = (ring->next + 1) % self->window;
    }
    ring->last = now;
    if (now >= self->until) {
        turn(self, now);
    }
    self->requests[self->slot]++;
    if (error) {
        self->errors[self->slot]++;
    }
}

/* A request ended: out of flight, and counted (-1: the clock failed, out of flight only). */
static int
finish(Counter *self, double started, Py_ssize_t found, int error)
{
    double now;
    if (read_clock(self, &now) < 0) {
        leave_flight(self);
        return -1;
    }
    leave_flight(self);
    count_end(self, started, found, now, error);
    return 0;
}

/* The ring of the nearest number found below `key` with latencies whose newest came at
   `oldest` or later, else the nearest above; NULL for none: _nearest. */
static Ring *
nearest(Counter *self, Py_ssize_t key, double oldest)
{
    Py_ssize_t number, size = self->max_found + 1;
    for (number = (key < size ? key : size) - 1; number >= 0; number--) {
        Ring *ring = &self->rings[number];
        if (ring->last >= oldest && ring->count > 0) {
            return ring;
        }
    }
    for (number = key + 1; number < size; number++) {
        Ring *ring = &self->rings[number];
        if (ring->last >= oldest && ring->count > 0) {
            return ring;
        }
    }
    return NULL;
}

static int
Counter_init(Counter *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"clock",     "origin",    "latency_window", "rate_window",
                               "max_found", "found_age", NULL};
    PyObject *clock;
    double origin, found_age, *store;
    Py_ssize_t window, rate_window, max_found, index;
    Ring *rings;
    long long *seconds, *requests, *errors;
    if (self->rings != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Counter is made once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Odnnnd", keywords, &clock, &origin, &window,
                                     &rate_window, &max_found, &found_age)) {
        return -1;
    }
    if (window < 1 || rate_window < 1 || max_found < 0 || window > MOST_WINDOW
        || rate_window > MOST_RATE_WINDOW || max_found > MOST_FOUND) {
        PyErr_Format(PyExc_ValueError,
                     "latency_window must be 1 to %d, rate_window 1 to %d and max_found 0 to %d, "
                     "got %zd, %zd, %zd",
                     MOST_WINDOW, MOST_RATE_WINDOW, MOST_FOUND, window, rate_window, max_found);
        return -1;
    }
    if (!isfinite(origin) || !isfinite(found_age)) {
        PyErr_SetString(PyExc_ValueError, "origin and found_age must be finite");
        return -1;
    }
    if (clock != Py_None && !PyCallable_Check(clock)) {
        PyErr_Format(PyExc_TypeError, "clock must be a callable or None, got %R", clock);
        return -1;
    }
    /* All or nothing: a counter whose memory was refused stays unmade (made() says so). */
    rings = PyMem_New(Ring, max_found + 1);
    store = PyMem_New(double, (max_found + 1) * window);
    seconds = PyMem_New(long long, rate_window);
    requests = PyMem_New(long long, rate_window);
    errors = PyMem_New(long long, rate_window);
    if (rings == NULL || store == NULL || seconds == NULL || requests == NULL
        || errors == NULL) {
        PyMem_Free(rings);
        PyMem_Free(store);
        PyMem_Free(seconds);
        PyMem_Free(requests);
        PyMem_Free(errors);
        PyErr_NoMemory();
        return -1;
    }
    self->rings = rings;
    self->store = store;
    self->seconds = seconds;
    self->requests = requests;
    self->errors = errors;
    for (index = 0; index <= max_found; index++) {
        self->rings[index].samples = self->store + index * window;
        self->rings[index].count = 0;
        self->rings[index].next = 0;
        self->rings[index].last = -Py_HUGE_VAL;
    }
    for (index = 0; index < rate_window; index++) {
        self->seconds[index] = -1;
        self->requests[index] = 0;
        self->errors[index] = 0;
    }
    Py_XSETREF(self->clock, clock == Py_None ? NULL : Py_NewRef(clock));
    self->has_clock = clock != Py_None;
    self->window = window;
    self->max_found = max_found;
    self->found_age = found_age;
    self->rate_window = rate_window;
    self->slot = 0;
    self->origin = origin;
    self->until = origin; /* the first end turns to its second's bucket */
    return 0;
}

static int
Counter_traverse(Counter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->clock);
    Py_VISIT(self->check);
    if (self->shared) {
        Py_VISIT(self->words.obj);
    }
    return 0;
}

static int
Counter_clear(Counter *self)
{
    Py_CLEAR(self->clock);
    stop_sharing(self);
    return 0;
}

static void
Counter_dealloc(Counter *self)
{
    PyObject_GC_UnTrack(self);
    Counter_clear(self);
    PyMem_Free(self->rings);
    PyMem_Free(self->store);
    PyMem_Free(self->seconds);
    PyMem_Free(self->requests);
    PyMem_Free(self->errors);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Whether the counter was made (its __init__ ran); else an exception is set. */
static int
made(Counter *self)
{
    if (self->rings == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Counter was not initialised");
        return 0;
    }
    return 1;
}

static Py_ssize_t
Counter_length(Counter *self)
{
    return self->flying;
}

static PyObject *
Counter_append(Counter *self, PyObject *unused)
{
    self->flying++;
    Py_RETURN_NONE;
}

static PyObject *
Counter_pop(Counter *self, PyObject *unused)
{
    if (self->flying == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from empty list");
        return NULL;
    }
    self->flying--;
    Py_RETURN_NONE;
}

static PyObject *
Counter_share(Counter *self, PyObject *args)
{
    PyObject *words, *check = NULL;
    Py_ssize_t own = 0;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "O|nO", &words, &own, &check)) {
        return NULL;
    }
    stop_sharing(self);
    if (words == Py_None) {
        Py_RETURN_NONE;
    }
    if (check == NULL || !PyCallable_Check(check)) {
        PyErr_SetString(PyExc_TypeError, "share(words, own, check): check must be a callable");
        return NULL;
    }
    /* Into a buffer of its own: the exporter may run Python code (a __buffer__), which may
       call share() again meanwhile; what that installed is given back before this is. */
    if (PyObject_GetBuffer(words, &view, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS)
        < 0) {
        return NULL;
    }
    if (view.itemsize != 8 || view.format == NULL || strcmp(view.format, "q") != 0
        || (uintptr_t)view.buf % 8 != 0 || own <= GENERATION_WORD || own >= view.len / 8) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError,
                     "share: words must be aligned 64-bit words holding word %zd", own);
        return NULL;
    }
    stop_sharing(self);
    self->words = view;
    self->shared = 1;
    self->own = own;
    self->check = Py_NewRef(check);
    self->generation = -1;
    self->next_check = -Py_HUGE_VAL;
    publish(self);
    Py_RETURN_NONE;
}

static PyObject *
Counter_begin(Counter *self, PyObject *unused)
{
    double now;
    Py_ssize_t found;
    if (arrive(self, &now, &found) < 0) {
        return NULL;
    }
    return Py_BuildValue("(dn)", now, found);
}

/* A start time's seconds into *seconds: a float's, or an int's (-1: neither, or an int too large
   for a double; no exception set). */
static int
seconds_of(PyObject *time, double *seconds)
{
    if (PyFloat_Check(time)) {
        *seconds = PyFloat_AS_DOUBLE(time);
        return 0;
    }
    if (!PyLong_Check(time)) {
        return -1;
    }
    *seconds = PyLong_AsDouble(time);
    if (*seconds == -1.0 && PyErr_Occurred()) {
        PyErr_Clear(); /* an OverflowError: not a time */
        return -1;
    }
    return 0;
}

/* The request of `arrival` is out of flight, and `arrival` is not one: a TypeError naming it. */
static PyObject *
not_an_arrival(Counter *self, PyObject *arrival)
{
    leave_flight(self);
    PyErr_Format(PyExc_TypeError,
                 "an arrival is (start time, requests found), as begin() returns it, or a start "
                 "time; got %R",
                 arrival);
    return NULL;
}

static PyObject *
Counter_end(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *arrival, *time;
    double started, now;
    Py_ssize_t found, others, flying;
    long long many;
    int error, overflow;
    if (!made(self)) {
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "end(arrival, error)");
        return NULL;
    }
    arrival = args[0];
    error = PyObject_IsTrue(args[1]);
    if (error < 0) {
        leave_flight(self);
        return NULL;
    }
    if (PyTuple_Check(arrival)) {
        if (PyTuple_GET_SIZE(arrival) != 2 || !PyLong_Check(PyTuple_GET_ITEM(arrival, 1))) {
            return not_an_arrival(self, arrival);
        }
        time = PyTuple_GET_ITEM(arrival, 0);
        if (seconds_of(time, &started) < 0) {
            return not_an_arrival(self, arrival);
        }
        /* Any int: those beyond the counted numbers count as the nearest (as _fold clamps). */
        many = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(arrival, 1), &overflow);
        if (many == -1 && PyErr_Occurred()) {
            leave_flight(self);
            return NULL;
        }
        found = overflow > 0 || many > PY_SSIZE_T_MAX   ? PY_SSIZE_T_MAX
                : overflow < 0 || many < PY_SSIZE_T_MIN ? PY_SSIZE_T_MIN
                                                         : (Py_ssize_t)many;
        if (finish(self, started, found, error) < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    /* A start time alone: it found what is in flight besides it now. */
    if (seconds_of(arrival, &started) < 0) {
        return not_an_arrival(self, arrival);
    }
    if (read_clock(self, &now) < 0) {
        leave_flight(self);
        return NULL;
    }
    flying = self->flying; /* before the others: reading them may run Python code */
    if (others_in_flight(self, now, &others) < 0) {
        leave_flight(self);
        return NULL;
    }
    leave_flight(self);
    count_end(self, started, flying - 1 + others, now, error);
    Py_RETURN_NONE;
}

static PyObject *
Counter_rates(Counter *self, PyObject *at)
{
    double now = PyFloat_AsDouble(at), elapsed, span;
    long long oldest, requests = 0, errors = 0;
    Py_ssize_t index;
    if (!made(self) || (now == -1.0 && PyErr_Occurred()) || check_time(self, now) < 0) {
        return NULL;
    }
    elapsed = now - self->origin;
    oldest = (long long)floor(elapsed) - self->rate_window + 1;
    if (oldest < 0) {
        oldest = 0;
    }
    for (index = 0; index < self->rate_window; index++) {
        if (self->seconds[index] >= oldest) {
            requests += self->requests[index];
            errors += self->errors[index];
        }
    }
    span = elapsed - (double)oldest;
    if (span < 1.0) {
        span = 1.0;
    }
    return Py_BuildValue("(dd)", (double)requests / span, (double)errors / span);
}

static PyObject *
Counter_samples(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t rif, key, index;
    double now;
    Ring *ring, *near;
    PyObject *samples;
    if (!made(self)) {
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "samples(rif, now)");
        return NULL;
    }
    rif = PyLong_AsSsize_t(args[0]);
    if (rif == -1 && PyErr_Occurred()) {
        return NULL;
    }
    now = PyFloat_AsDouble(args[1]);
    if ((now == -1.0 && PyErr_Occurred()) || check_time(self, now) < 0) {
        return NULL;
    }
    key = rif < self->max_found ? rif : self->max_found;
    if (key < 0) {
        key = 0;
    }
    ring = &self->rings[key];
    if (ring->last < now - self->found_age) {
        near = nearest(self, key, now - self->found_age);
        if (near == NULL && ring->count == 0) {
            near = nearest(self, key, -Py_HUGE_VAL);
        }
        if (near != NULL) {
            ring = near;
        }
    }
    samples = PyList_New(ring->count);
    if (samples == NULL) {
        return NULL;
    }
    for (index = 0; index < ring->count; index++) {
        PyObject *value = PyFloat_FromDouble(ring->samples[index]);
        if (value == NULL) {
            Py_DECREF(samples);
            return NULL;
        }
        PyList_SET_ITEM(samples, index, value);
    }
    return samples;
}

static PyObject *
Counter_others(Counter *self, PyObject *now)
{
    double at = PyFloat_AsDouble(now);
    Py_ssize_t others;
    if ((at == -1.0 && PyErr_Occurred()) || others_in_flight(self, at, &others) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(others);
}

static PyObject *
Counter_get_shared(Counter *self, void *unused)
{
    return PyBool_FromLong(self->shared);
}

static PyMethodDef Counter_methods[] = {
    {"append", (PyCFunction)Counter_append, METH_O, "One request more in flight."},
    {"pop", (PyCFunction)Counter_pop, METH_NOARGS,
     "One request fewer in flight (IndexError where none is)."},
    {"share", (PyCFunction)Counter_share, METH_VARARGS,
     "share(words, own, check) publishes the count in words[own] and adds the others' up as "
     "check(now) names them; share(None) stops."},
    {"begin", (PyCFunction)Counter_begin, METH_NOARGS,
     "A request arrived: counted; returns (its time, the requests it found in flight)."},
    {"end", (PyCFunction)(void (*)(void))Counter_end, METH_FASTCALL,
     "end(arrival, error): the request of arrival ((time, found), or a time alone) ended: out "
     "of flight, its latency and it (an error if error) counted."},
    {"rates", (PyCFunction)Counter_rates, METH_O,
     "rates(now): (requests, errors) per second over the rate window."},
    {"samples", (PyCFunction)(void (*)(void))Counter_samples, METH_FASTCALL,
     "samples(rif, now): the latencies (seconds) a request finding rif in flight may expect."},
    {"others", (PyCFunction)Counter_others, METH_O,
     "others(now): the other processes' requests in flight (0 where not shared)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Counter_getset[] = {
    {"shared", (getter)Counter_get_shared, NULL, "Whether the count is published.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Counter_sequence = {
    .sq_length = (lenfunc)Counter_length,
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lbclient.server._counting.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "What a tracker counts per request (see the module's account).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counter_init,
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_traverse = (traverseproc)Counter_traverse,
    .tp_clear = (inquiry)Counter_clear,
    .tp_as_sequence = &Counter_sequence,
    .tp_methods = Counter_methods,
    .tp_getset = Counter_getset,
};

/* ---- Reply ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *send;
    Counter *counter;
    PyObject *tracker;
    PyObject *asked; /* "TEXT", "JSON", or NULL: no report asked */
    PyObject *lines; /* the tracker's rendered reports, by form */
    double refresh;  /* seconds a rendered report is used for */
    double arrival;
    Py_ssize_t found;
    int status; /* 500 until a response starts: an app that returns without one gets a 500 */
    int over;   /* ended or dropped */
} Reply;

static PyTypeObject ReplyType;

/* Whether header name `name` is the report's, as the Python path asks it (`len(name) ==
   REPORT_LENGTH and name.lower() == REPORT`): 1, 0, or -1 with an exception set. */
static int
is_report_name(PyObject *name)
{
    const char *text;
    Py_ssize_t index, length;
    PyObject *lowered;
    int same;
    if (PyBytes_CheckExact(name)) {
        if (PyBytes_GET_SIZE(name) != REPORT_LENGTH) {
            return 0;
        }
        text = PyBytes_AS_STRING(name);
        for (index = 0; index < REPORT_LENGTH; index++) {
            char c = text[index];
            if (c >= 'A' && c <= 'Z') {
                c = (char)(c - 'A' + 'a');
            }
            if (c != REPORT[index]) {
                return 0;
            }
        }
        return 1;
    }
    length = PyObject_Length(name);
    if (length < 0) {
        return -1;
    }
    if (length != REPORT_LENGTH) {
        return 0;
    }
    lowered = PyObject_CallMethod(name, "lower", NULL);
    if (lowered == NULL) {
        return -1;
    }
    same = PyObject_RichCompareBool(lowered, REPORT_NAME, Py_EQ);
    Py_DECREF(lowered);
    return same;
}

/* The report's header value, as the tracker's encoded(asked) gives it (where `lines` is None,
   a subclass's own encoded: by calling it). Else as LoadTracker.encoded makes it: the clock
   read, then the value from the tracker's lines where the one of this form is fresh (rendered
   less than `refresh` seconds ago) and has made the value for as many in flight as now; where
   not, the tracker's _encoded_at(form, now), with the time read here. A new reference, or NULL
   with an exception set. */
static PyObject *
encoded(Reply *self)
{
    PyObject *line, *values, *key, *value = NULL, *at, *made;
    double now, age;
    Py_ssize_t rif, others;
    if (self->lines == Py_None) {
        return PyObject_CallMethodOneArg(self->tracker, ENCODED, self->asked);
    }
    if (read_clock(self->counter, &now) < 0) {
        return NULL;
    }
    line = PyDict_GetItemWithError(self->lines, self->asked);
    if (line == NULL && PyErr_Occurred()) {
        return NULL;
    }
    if (line != NULL && PyTuple_CheckExact(line) && PyTuple_GET_SIZE(line) == 6
        && PyFloat_CheckExact(PyTuple_GET_ITEM(line, 0))
        && PyDict_CheckExact(PyTuple_GET_ITEM(line, 5))) {
        age = now - PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(line, 0));
        if (0.0 <= age && age < self->refresh) {
            Py_INCREF(line); /* the others' check may run Python code, which may replace it */
            rif = self->counter->flying - 1; /* the request answered is on its way out */
            if (rif < 0) {
                rif = 0;
            }
            if (others_in_flight(self->counter, now, &others) < 0) {
                Py_DECREF(line);
                return NULL;
            }
            key = PyLong_FromSsize_t(rif + others);
            if (key == NULL) {
                Py_DECREF(line);
                return NULL;
            }
            values = PyTuple_GET_ITEM(line, 5);
            value = PyDict_GetItemWithError(values, key);
            Py_DECREF(key);
            if (value == NULL && PyErr_Occurred()) {
                Py_DECREF(line);
                return NULL;
            }
            if (value != NULL && !PyBytes_CheckExact(value)) {
                value = NULL;
            }
            Py_XINCREF(value);
            Py_DECREF(line);
        }
    }
    if (value != NULL) {
        return value;
    }
    at = PyFloat_FromDouble(now);
    if (at == NULL) {
        return NULL;
    }
    made = PyObject_CallMethodObjArgs(self->tracker, ENCODED_AT, self->asked, at, NULL);
    Py_DECREF(at);
    return made;
}

/* The first of `item`'s two items, as `name, _ = item` unpacks it (at most three read): a new
   reference, or NULL with the exception that unpacking raises. */
static PyObject *
first_of_pair(PyObject *item)
{
    PyObject *iterator, *taken[3] = {NULL, NULL, NULL};
    Py_ssize_t count = 0;
    iterator = PyObject_GetIter(item);
    if (iterator == NULL) {
        return NULL;
    }
    while (count < 3) {
        taken[count] = PyIter_Next(iterator);
        if (taken[count] == NULL) {
            break;
        }
        count++;
    }
    Py_DECREF(iterator);
    Py_XDECREF(taken[1]);
    Py_XDECREF(taken[2]);
    if (PyErr_Occurred()) {
        Py_XDECREF(taken[0]);
        return NULL;
    }
    if (count != 2) {
        Py_XDECREF(taken[0]);
        if (count < 2) {
            PyErr_Format(PyExc_ValueError, "not enough values to unpack (expected 2, got %zd)",
                         count);
        }
        else {
            PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 2)");
        }
        return NULL;
    }
    return taken[0];
}

/* `message` with the report added to its headers (a new dict), or `message` itself where the
   app set the header; NULL with an exception set. */
static PyObject *
with_report(Reply *self, PyObject *message)
{
    PyObject *given, *headers, *value, *pair, *copy;
    Py_ssize_t index, count;
    int found;
    if (PyDict_CheckExact(message)) {
        given = PyDict_GetItemWithError(message, KEY_HEADERS);
        if (given == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            given = EMPTY;
        }
        Py_INCREF(given);
    }
    else {
        given = PyObject_CallMethod(message, "get", "OO", KEY_HEADERS, EMPTY);
        if (given == NULL) {
            return NULL;
        }
    }
    headers = PySequence_List(given);
    Py_DECREF(given);
    if (headers == NULL) {
        return NULL;
    }
    count = PyList_GET_SIZE(headers);
    for (index = 0; index < count; index++) {
        PyObject *item = PyList_GET_ITEM(headers, index), *items;
        if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
            found = is_report_name(PyTuple_GET_ITEM(item, 0));
        }
        else {
            items = first_of_pair(item);
            if (items == NULL) {
                Py_DECREF(headers);
                return NULL;
            }
            found = is_report_name(items);
            Py_DECREF(items);
        }
        if (found != 0) {
            Py_DECREF(headers);
            /* -1: the name could not be read; 1: the app reported itself */
            return found < 0 ? NULL : Py_NewRef(message);
        }
    }
    value = encoded(self);
    if (value == NULL) {
        Py_DECREF(headers);
        return NULL;
    }
    pair = PyTuple_Pack(2, REPORT_NAME, value);
    Py_DECREF(value);
    if (pair == NULL || PyList_Append(headers, pair) < 0) {
        Py_XDECREF(pair);
        Py_DECREF(headers);
        return NULL;
    }
    Py_DECREF(pair);
    copy = PyDict_New();
    if (copy == NULL || PyDict_Update(copy, message) < 0
        || PyDict_SetItem(copy, KEY_HEADERS, headers) < 0) {
        Py_XDECREF(copy);
        Py_DECREF(headers);
        return NULL;
    }
    Py_DECREF(headers);
    return copy;
}

static PyObject *
Reply_vectorcall(Reply *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    PyObject *message, *kind, *status, *sent;
    int started;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "send takes one message");
        return NULL;
    }
    if (self->send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Reply was cleared");
        return NULL;
    }
    message = args[0];
    if (PyDict_CheckExact(message)) { /* what servers and apps send: read without a call */
        kind = PyDict_GetItemWithError(message, KEY_TYPE);
        if (kind == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, KEY_TYPE);
            }
            return NULL;
        }
        Py_INCREF(kind);
    }
    else {
        kind = PyObject_GetItem(message, KEY_TYPE);
        if (kind == NULL) {
            return NULL;
        }
    }
    if (kind == START) {
        started = 1;
    }
    else if (PyUnicode_CheckExact(kind) && PyUnicode_IS_COMPACT_ASCII(kind)) {
        started = PyUnicode_GET_LENGTH(kind) == START_LENGTH
                  && memcmp(PyUnicode_DATA(kind), START_TEXT, START_LENGTH) == 0;
    }
    else {
        started = PyObject_RichCompareBool(kind, START, Py_EQ);
        if (started < 0) {
            Py_DECREF(kind);
            return NULL;
        }
    }
    Py_DECREF(kind);
    if (!started) {
        return PyObject_CallOneArg(self->send, message);
    }
    if (PyDict_CheckExact(message)) {
        status = PyDict_GetItemWithError(message, KEY_STATUS);
        if (status == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, KEY_STATUS);
            }
            return NULL;
        }
        Py_INCREF(status);
    }
    else {
        status = PyObject_GetItem(message, KEY_STATUS);
        if (status == NULL) {
            return NULL;
        }
    }
    if (PyLong_CheckExact(status)) {
        int overflow;
        long value = PyLong_AsLongAndOverflow(status, &overflow);
        self->status = overflow > 0 || value >= 500 ? 500 : overflow < 0 || value < 0 ? 0
                                                                                       : (int)value;
    }
    else { /* as the Python path: an error where status >= 500, or it does not compare */
        int failed = PyObject_RichCompareBool(status, FIVE_HUNDRED, Py_GE);
        if (failed < 0) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(status);
                return NULL; /* KeyboardInterrupt and the like reach the app */
            }
            PyErr_Clear();
        }
        self->status = failed != 0 ? 500 : 0;
    }
    Py_DECREF(status);
    if (self->asked == NULL) {
        return PyObject_CallOneArg(self->send, message);
    }
    message = with_report(self, message);
    if (message == NULL) {
        return NULL;
    }
    sent = PyObject_CallOneArg(self->send, message);
    Py_DECREF(message);
    return sent;
}

/* The request is over: counted, an error if `error` or its status is 500 or more (once; later
   ends and drops do nothing). 0, or -1 with an exception set. */
static int
reply_end(Reply *self, int error)
{
    if (self->over || self->counter == NULL) {
        return 0;
    }
    self->over = 1;
    return finish(self->counter, self->arrival, self->found, error || self->status >= 500);
}

/* The request was cancelled: out of flight only (once). */
static void
reply_drop(Reply *self)
{
    if (!self->over && self->counter != NULL) {
        self->over = 1;
        leave_flight(self->counter);
    }
}

static PyObject *
Reply_end(Reply *self, PyObject *raised)
{
    int error = PyObject_IsTrue(raised);
    if (error < 0 || reply_end(self, error) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Reply_drop(Reply *self, PyObject *unused)
{
    reply_drop(self);
    Py_RETURN_NONE;
}

static PyObject *
Reply_get_status(Reply *self, void *unused)
{
    return PyLong_FromLong(self->status);
}

static PyObject *
Reply_get_arrival(Reply *self, void *unused)
{
    return Py_BuildValue("(dn)", self->arrival, self->found);
}

static int
Reply_traverse(Reply *self, visitproc visit, void *arg)
{
    Py_VISIT(self->send);
    Py_VISIT(self->counter);
    Py_VISIT(self->tracker);
    Py_VISIT(self->asked);
    Py_VISIT(self->lines);
    return 0;
}

static int
Reply_clear(Reply *self)
{
    Py_CLEAR(self->send);
    Py_CLEAR(self->counter);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->asked);
    Py_CLEAR(self->lines);
    return 0;
}

static void
Reply_dealloc(Reply *self)
{
    PyObject_GC_UnTrack(self);
    Reply_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Reply_methods[] = {
    {"end", (PyCFunction)Reply_end, METH_O,
     "end(raised): the request is over: counted, an error if raised or its status is 500 or "
     "more (once; later ends and drops do nothing)."},
    {"drop", (PyCFunction)Reply_drop, METH_NOARGS,
     "The request was cancelled: out of flight only (once)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Reply_getset[] = {
    {"status", (getter)Reply_get_status, NULL, "The response's status as counted (500 until one "
     "starts).", NULL},
    {"arrival", (getter)Reply_get_arrival, NULL, "(arrival time, requests found in flight).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReplyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lbclient.server._counting.Reply",
    .tp_basicsize = sizeof(Reply),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The send an app gets from LoadReportingASGI (see the module's account).",
    .tp_vectorcall_offset = offsetof(Reply, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)Reply_dealloc,
    .tp_traverse = (traverseproc)Reply_traverse,
    .tp_clear = (inquiry)Reply_clear,
    .tp_methods = Reply_methods,
    .tp_getset = Reply_getset,
};

/* ---- Gate ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Counter *counter;
    PyObject *tracker;
    PyObject *probe_path; /* a str, or None */
    PyObject *requested;  /* requested_format(value): the format of any other value, or None */
    PyObject *lines;      /* the tracker's rendered reports, by form (a dict) */
    double refresh;       /* seconds a rendered report is used for */
} Gate;

static int
Gate_init(Gate *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"counter", "tracker", "probe_path", "requested",
                               "lines",   "refresh", NULL};
    PyObject *counter, *tracker, *probe_path, *requested, *lines;
    double refresh;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!OOOOd", keywords, &CounterType, &counter,
                                     &tracker, &probe_path, &requested, &lines, &refresh)) {
        return -1;
    }
    if (lines != Py_None && !PyDict_CheckExact(lines)) {
        PyErr_Format(PyExc_TypeError, "lines must be a dict or None, got %R", lines);
        return -1;
    }
    if (!made((Counter *)counter)) {
        return -1;
    }
    if (probe_path != Py_None && !PyUnicode_Check(probe_path)) {
        PyErr_Format(PyExc_TypeError, "probe_path must be a str or None, got %R", probe_path);
        return -1;
    }
    Py_XSETREF(self->counter, (Counter *)Py_NewRef(counter));
    Py_XSETREF(self->tracker, Py_NewRef(tracker));
    Py_XSETREF(self->probe_path, Py_NewRef(probe_path));
    Py_XSETREF(self->requested, Py_NewRef(requested));
    Py_XSETREF(self->lines, Py_NewRef(lines));
    self->refresh = refresh;
    return 0;
}

/* The format a request's headers ask for (a new reference, Py_None for none); NULL: the
   headers are not of the usual shape (no exception set) or reading them failed (one set). */
static PyObject *
asked_of(Gate *self, PyObject *headers)
{
    Py_ssize_t index, count;
    PyObject *asked;
    if (!PyList_CheckExact(headers) && !PyTuple_CheckExact(headers)) {
        return NULL;
    }
    count = PySequence_Fast_GET_SIZE(headers);
    for (index = 0; index < count; index++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(headers, index), *name, *value;
        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return NULL;
        }
        name = PyTuple_GET_ITEM(pair, 0);
        if (!PyBytes_CheckExact(name)) {
            return NULL;
        }
        if (PyBytes_GET_SIZE(name) != ASKING_LENGTH
            || memcmp(PyBytes_AS_STRING(name), ASKING, ASKING_LENGTH) != 0) {
            continue;
        }
        value = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_CheckExact(value)) {
            return NULL; /* the Python path reads (or refuses) any other value */
        }
        if (PyBytes_GET_SIZE(value) == 4) {
            const char *text = PyBytes_AS_STRING(value);
            if (memcmp(text, "TEXT", 4) == 0 || memcmp(text, "text", 4) == 0) {
                return Py_NewRef(TEXT);
            }
            if (memcmp(text, "JSON", 4) == 0 || memcmp(text, "json", 4) == 0) {
                return Py_NewRef(JSON);
            }
        }
        Py_INCREF(value); /* held while Python code runs */
        asked = PyObject_CallOneArg(self->requested, value);
        Py_DECREF(value);
        return asked;
    }
    return Py_NewRef(Py_None);
}

/* The Reply of a request of the usual path, counted as arrived (a new reference); Py_None for
   any other; NULL with an exception set. */
static PyObject *
gate_enter(Gate *self, PyObject *scope, PyObject *send)
{
    PyObject *value, *joined, *asked;
    Reply *reply;
    int same;
    if (self->counter == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Gate was not initialised");
        return NULL;
    }
    if (!PyDict_CheckExact(scope)) {
        Py_RETURN_NONE;
    }
    value = PyDict_GetItemWithError(scope, KEY_TYPE);
    if (value == NULL || !PyUnicode_Check(value)) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (value != HTTP && PyUnicode_Compare(value, HTTP) != 0) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    joined = PyObject_GetAttr(self->tracker, JOINED);
    if (joined == NULL) {
        return NULL;
    }
    same = joined == Py_True;
    Py_DECREF(joined);
    if (!same) {
        Py_RETURN_NONE; /* the first request: the Python path finds the port to share at */
    }
    value = PyDict_GetItemWithError(scope, KEY_PATH);
    if (value == NULL) { /* the Python path says what is wrong */
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (self->probe_path != Py_None) {
        if (!PyUnicode_CheckExact(value)) {
            Py_RETURN_NONE;
        }
        same = PyUnicode_Compare(value, self->probe_path);
        if (same == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (same == 0) {
            Py_RETURN_NONE;
        }
    }
    value = PyDict_GetItemWithError(scope, KEY_HEADERS);
    if (value == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    asked = asked_of(self, value);
    if (asked == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    reply = PyObject_GC_New(Reply, &ReplyType);
    if (reply == NULL) {
        Py_DECREF(asked);
        return NULL;
    }
    reply->vectorcall = (vectorcallfunc)Reply_vectorcall;
    reply->send = Py_NewRef(send);
    reply->counter = (Counter *)Py_NewRef(self->counter);
    reply->tracker = Py_NewRef(self->tracker);
    reply->lines = Py_NewRef(self->lines);
    reply->refresh = self->refresh;
    if (asked == Py_None) {
        Py_DECREF(asked);
        reply->asked = NULL;
    }
    else {
        reply->asked = asked;
    }
    reply->status = 500;
    reply->over = 0;
    reply->found = 0;
    reply->arrival = 0.0;
    if (arrive(self->counter, &reply->arrival, &reply->found) < 0) {
        reply->over = 1;
        Py_DECREF(reply);
        return NULL;
    }
    PyObject_GC_Track(reply);
    return (PyObject *)reply;
}

static PyObject *
Gate_enter(Gate *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "enter(scope, send)");
        return NULL;
    }
    return gate_enter(self, args[0], args[1]);
}

static int
Gate_traverse(Gate *self, visitproc visit, void *arg)
{
    Py_VISIT(self->counter);
    Py_VISIT(self->tracker);
    Py_VISIT(self->probe_path);
    Py_VISIT(self->requested);
    Py_VISIT(self->lines);
    return 0;
}

static int
Gate_clear(Gate *self)
{
    Py_CLEAR(self->counter);
    Py_CLEAR(self->tracker);
    Py_CLEAR(self->probe_path);
    Py_CLEAR(self->requested);
    Py_CLEAR(self->lines);
    return 0;
}

static void
Gate_dealloc(Gate *self)
{
    PyObject_GC_UnTrack(self);
    Gate_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Gate_methods[] = {
    {"enter", (PyCFunction)(void (*)(void))Gate_enter, METH_FASTCALL,
     "enter(scope, send): the Reply of a request of the usual path, counted as arrived; None "
     "for any other (the caller's Python path takes it)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lbclient.server._counting.Gate",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "LoadReportingASGI's per-request path up to the app (see the module's account).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Gate_init,
    .tp_dealloc = (destructor)Gate_dealloc,
    .tp_traverse = (traverseproc)Gate_traverse,
    .tp_clear = (inquiry)Gate_clear,
    .tp_methods = Gate_methods,
};

/* ---- Middleware and Call ---------------------------------------------------------------- */

/* What calling LoadReportingASGI makes: an awaitable that runs the request as its Python
   `async def` would, without a Python frame of its own. At its first step it asks the Gate:
   a request of the usual path is counted as arrived and the app awaited with the Reply as its
   send; any other goes to the middleware's Python path (_in_python), awaited as it is. The app
   returning ends the request; an Exception ends it as an error; any other BaseException
   (cancelled, closed) drops it. It is a coroutine to those that drive it (send, throw, close,
   __await__), and steps the app's coroutine as `await` would. */

typedef struct {
    PyObject_HEAD
    PyObject *app;  /* the app called (settable: read at each request) */
    PyObject *gate; /* a Gate, or NULL: every request takes the Python path */
} Middleware;

enum { CALL_NEW, CALL_RUNNING, CALL_DONE };

typedef struct {
    PyObject_HEAD
    PyObject *middleware;
    PyObject *scope, *receive, *send;
    PyObject *inner; /* what is awaited while running: the app's coroutine or __await__ */
    Reply *reply;    /* the counted request's send; NULL where the Python path counts */
    int state;
    int stepping; /* inside a step: a second step now is refused, as a coroutine refuses it */
} Call;

static PyTypeObject CallType;
static PyObject *IN_PYTHON; /* "_in_python" */
static PyObject *CR_AWAIT;  /* the coroutine type's cr_await descriptor */

/* The exception being raised, taken (a new reference; the error indicator is cleared). */
static PyObject *
take_error(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *kind, *value, *traceback;
    PyErr_Fetch(&kind, &value, &traceback);
    PyErr_NormalizeException(&kind, &value, &traceback);
    if (traceback != NULL && value != NULL) {
        PyException_SetTraceback(value, traceback);
    }
    Py_XDECREF(kind);
    Py_XDECREF(traceback);
    return value;
#endif
}

/* Raises `error` again (its reference is taken). */
static void
give_error(PyObject *error)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(error);
#else
    PyErr_Restore(Py_NewRef(Py_TYPE(error)), error, PyException_GetTraceback(error));
#endif
}

/* What `await` steps for `awaitable` (a new reference), as the interpreter finds it: a
   coroutine (or a generator made one by types.coroutine) itself, else its __await__()'s
   iterator; NULL with the TypeError `await` raises. */
static int
is_coroutine(PyObject *candidate)
{
    PyObject *code, *flags;
    long value;
    if (PyCoro_CheckExact(candidate)) {
        return 1;
    }
    if (!PyGen_CheckExact(candidate)) {
        return 0;
    }
    code = PyObject_GetAttrString(candidate, "gi_code");
    if (code == NULL) {
        return -1;
    }
    flags = PyObject_GetAttrString(code, "co_flags");
    Py_DECREF(code);
    if (flags == NULL) {
        return -1;
    }
    value = PyLong_AsLong(flags);
    Py_DECREF(flags);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    return (value & CO_ITERABLE_COROUTINE) != 0;
}

static PyObject *
awaited_of(PyObject *awaitable)
{
    unaryfunc method;
    PyObject *iterator, *waiting;
    int coroutine = is_coroutine(awaitable);
    if (coroutine < 0) {
        return NULL;
    }
    if (coroutine) {
        if (PyCoro_CheckExact(awaitable)) { /* one suspended in an await is another's */
            /* its cr_await, read through the descriptor itself (no attribute lookup) */
            waiting = Py_TYPE(CR_AWAIT)->tp_descr_get(CR_AWAIT, awaitable,
                                                      (PyObject *)Py_TYPE(awaitable));
            if (waiting == NULL) {
                return NULL;
            }
            coroutine = waiting != Py_None;
            Py_DECREF(waiting);
            if (coroutine) {
                PyErr_SetString(PyExc_RuntimeError, "coroutine is being awaited already");
                return NULL;
            }
        }
        return Py_NewRef(awaitable);
    }
    method = Py_TYPE(awaitable)->tp_as_async == NULL ? NULL
                                                     : Py_TYPE(awaitable)->tp_as_async->am_await;
    if (method == NULL) {
        PyErr_Format(PyExc_TypeError, "object %.100s can't be used in 'await' expression",
                     Py_TYPE(awaitable)->tp_name);
        return NULL;
    }
    iterator = method(awaitable);
    if (iterator == NULL) {
        return NULL;
    }
    coroutine = is_coroutine(iterator);
    if (coroutine != 0 || !PyIter_Check(iterator)) {
        if (coroutine >= 0) {
            if (coroutine) {
                PyErr_SetString(PyExc_TypeError, "__await__() returned a coroutine");
            }
            else {
                PyErr_Format(PyExc_TypeError, "__await__() returned non-iterator of type '%.100s'",
                             Py_TYPE(iterator)->tp_name);
            }
        }
        Py_DECREF(iterator);
        return NULL;
    }
    return iterator;
}

/* The first step: the request counted and the app called with the Reply, or the Python path
   called. 0; -1 with an exception set (where a Reply was made, the request is counted and
   ends with it as an error). */
static int
call_begin(Call *self)
{
    Middleware *middleware = (Middleware *)self->middleware;
    PyObject *gate = middleware->gate, *awaitable, *reply, *app, *args[3];
    if (gate != NULL && Py_IS_TYPE(gate, &GateType)) {
        Py_INCREF(gate); /* the request's gate, whatever the app does to the middleware */
        reply = gate_enter((Gate *)gate, self->scope, self->send);
        Py_DECREF(gate);
        if (reply == NULL) {
            return -1;
        }
        if (reply != Py_None) {
            self->reply = (Reply *)reply;
            if (middleware->app == NULL) {
                PyErr_SetString(PyExc_AttributeError, "the middleware has no app");
                return -1;
            }
            app = Py_NewRef(middleware->app); /* whatever the app does to the middleware */
            args[0] = self->scope;
            args[1] = self->receive;
            args[2] = reply;
            awaitable = PyObject_Vectorcall(app, args, 3, NULL);
            Py_DECREF(app);
            if (awaitable == NULL) {
                return -1;
            }
            self->inner = awaited_of(awaitable);
            Py_DECREF(awaitable);
            return self->inner == NULL ? -1 : 0;
        }
        Py_DECREF(reply);
    }
    awaitable = PyObject_CallMethodObjArgs(self->middleware, IN_PYTHON, self->scope,
                                           self->receive, self->send, NULL);
    if (awaitable == NULL) {
        return -1;
    }
    self->inner = awaited_of(awaitable);
    Py_DECREF(awaitable);
    return self->inner == NULL ? -1 : 0;
}

/* What a finished coroutine's frame lets go of: the app's awaitable, the request's scope,
   receive and send, the middleware. */
static void
call_release(Call *self)
{
    self->state = CALL_DONE;
    Py_CLEAR(self->inner);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
    Py_CLEAR(self->middleware);
}

/* The exception leaving the call, as it leaves a coroutine: a StopIteration as the RuntimeError
   "coroutine raised StopIteration", its cause (PEP 479; its drivers would read a StopIteration
   as the call's return). */
static PySendResult
raised_out(void)
{
    PyObject *stop, *error;
    if (!PyErr_ExceptionMatches(PyExc_StopIteration)) {
        return PYGEN_ERROR;
    }
    stop = take_error();
    error = PyObject_CallFunction(PyExc_RuntimeError, "s", "coroutine raised StopIteration");
    if (error == NULL) {
        Py_XDECREF(stop);
        return PYGEN_ERROR;
    }
    if (stop != NULL) {
        PyException_SetContext(error, Py_NewRef(stop));
        PyException_SetCause(error, stop);
    }
    give_error(error);
    return PYGEN_ERROR;
}

/* The request is over, as the step that ended it says (`status`, PYGEN_RETURN with `*result`
   or PYGEN_ERROR with an exception set): the app's return ends it, an Exception ends it as an
   error, any other exception drops it. What the Call gives: None on return, or the exception
   (an end that raises raises its own, the app's as its context). */
static PySendResult
call_over(Call *self, PySendResult status, PyObject **result)
{
    Reply *reply = self->reply;
    PyObject *error, *later;
    int failed = 0;
    self->reply = NULL;
    call_release(self);
    if (status == PYGEN_RETURN) {
        Py_CLEAR(*result); /* as `await self.app(...)` in an async def returning None */
        if (reply != NULL) {
            failed = reply_end(reply, 0);
            Py_DECREF(reply);
        }
        if (failed < 0) {
            return raised_out();
        }
        *result = Py_NewRef(Py_None);
        return PYGEN_RETURN;
    }
    *result = NULL;
    if (reply != NULL) {
        failed = PyErr_ExceptionMatches(PyExc_Exception);
        error = take_error();
        if (failed) {
            failed = reply_end(reply, 1);
        }
        else {
            reply_drop(reply);
        }
        Py_DECREF(reply);
        if (failed < 0) {
            later = take_error();
            if (error != NULL) {
                PyException_SetContext(later, error); /* takes the reference */
            }
            give_error(later);
        }
        else if (error != NULL) {
            give_error(error);
        }
    }
    return raised_out();
}

static int
call_busy(Call *self)
{
    if (self->stepping) {
        PyErr_SetString(PyExc_ValueError, "coroutine already executing");
        return 1;
    }
    return 0;
}

static PySendResult
Call_am_send(Call *self, PyObject *value, PyObject **result)
{
    PySendResult status;
    *result = NULL;
    if (call_busy(self)) {
        return PYGEN_ERROR;
    }
    if (self->state == CALL_DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        return PYGEN_ERROR;
    }
    self->stepping = 1;
    if (self->state == CALL_NEW) {
        if (value != Py_None) {
            self->stepping = 0;
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            return PYGEN_ERROR;
        }
        self->state = CALL_RUNNING;
        if (call_begin(self) < 0) {
            status = call_over(self, PYGEN_ERROR, result);
            self->stepping = 0;
            return status;
        }
    }
    status = PyIter_Send(self->inner, value, result);
    if (status != PYGEN_NEXT) {
        status = call_over(self, status, result);
    }
    self->stepping = 0;
    return status;
}

/* A step's outcome as a Python method gives it: the value yielded, or StopIteration. */
static PyObject *
stepped(PySendResult status, PyObject *result)
{
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else {
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
Call_iternext(Call *self)
{
    PyObject *result;
    PySendResult status = Call_am_send(self, Py_None, &result);
    if (status == PYGEN_RETURN) { /* the end of iteration: no StopIteration needed for None */
        Py_DECREF(result);
        return NULL;
    }
    return stepped(status, result);
}

static PyObject *
Call_send(Call *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = Call_am_send(self, value, &result);
    return stepped(status, result);
}

/* Raises what throw(kind[, value[, traceback]]) names, as a coroutine not started does: 1;
   0 where the arguments are refused (a TypeError raised instead). */
static int
raise_thrown(PyObject *kind, PyObject *value, PyObject *traceback)
{
    PyObject *type, *instance, *trace;
    if (traceback == Py_None) {
        traceback = NULL;
    }
    if (traceback != NULL && !PyTraceBack_Check(traceback)) {
        PyErr_SetString(PyExc_TypeError, "throw() third argument must be a traceback object");
        return 0;
    }
    if (PyExceptionClass_Check(kind)) {
        type = Py_NewRef(kind);
        instance = Py_XNewRef(value);
        trace = Py_XNewRef(traceback);
        PyErr_NormalizeException(&type, &instance, &trace); /* an instance of a subclass kept */
        PyErr_Restore(type, instance, trace);
        return 1;
    }
    if (PyExceptionInstance_Check(kind)) {
        if (value != NULL && value != Py_None) {
            PyErr_SetString(PyExc_TypeError, "instance exception may not have a separate value");
            return 0;
        }
        if (traceback == NULL) {
            PyErr_Restore(Py_NewRef(Py_TYPE(kind)), Py_NewRef(kind),
                          PyException_GetTraceback(kind));
        }
        else {
            PyErr_Restore(Py_NewRef(Py_TYPE(kind)), Py_NewRef(kind), Py_NewRef(traceback));
        }
        return 1;
    }
    PyErr_Format(PyExc_TypeError,
                 "exceptions must be classes or instances deriving from BaseException, not %s",
                 Py_TYPE(kind)->tp_name);
    return 0;
}

/* `inner`'s method `name` (a new reference); NULL: it has none (no exception) or reading it
   failed (one set). */
static PyObject *
method_of(PyObject *inner, const char *name)
{
    PyObject *method = PyObject_GetAttrString(inner, name);
    if (method == NULL && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
    }
    return method;
}

static PyObject *
Call_throw(Call *self, PyObject *args)
{
    PyObject *kind, *value = NULL, *traceback = NULL, *method, *result = NULL;
    PySendResult status;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &kind, &value, &traceback)) {
        return NULL;
    }
    if (call_busy(self)) {
        return NULL;
    }
    if (self->state == CALL_DONE) { /* the arguments checked first, as a coroutine does */
        if (raise_thrown(kind, value, traceback)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        }
        return NULL;
    }
    if (self->state == CALL_NEW) { /* raised before anything ran, as in a coroutine */
        if (raise_thrown(kind, value, traceback)) {
            call_release(self);
#if PY_VERSION_HEX < 0x030C0000
            raised_out(); /* up to 3.11 it left the coroutine's frame, as any exception */
#endif
        }
        return NULL;
    }
    self->stepping = 1;
    if (PyExceptionClass_Check(kind) ? PyErr_GivenExceptionMatches(kind, PyExc_GeneratorExit)
                                     : PyObject_TypeCheck(kind, (PyTypeObject *)PyExc_GeneratorExit)) {
        /* as a coroutine: what it awaits is closed, then the exception raised where it waits */
        method = method_of(self->inner, "close");
        if (method != NULL) {
            result = PyObject_CallNoArgs(method);
            Py_DECREF(method);
            Py_XDECREF(result);
            result = NULL;
            if (!PyErr_Occurred()) {
                raise_thrown(kind, value, traceback);
            }
        }
        else if (!PyErr_Occurred()) {
            raise_thrown(kind, value, traceback);
        }
        status = call_over(self, PYGEN_ERROR, &result);
        self->stepping = 0;
        return stepped(status, result);
    }
    method = method_of(self->inner, "throw");
    if (method != NULL) {
        result = PyObject_Call(method, args, NULL);
        Py_DECREF(method);
        if (result != NULL) {
            self->stepping = 0;
            return result;
        }
    }
    else if (!PyErr_Occurred()) { /* nothing to throw it into: raised where it is awaited */
        raise_thrown(kind, value, traceback);
    }
    status = PYGEN_ERROR;
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *stop = take_error();
        result = PyObject_GetAttrString(stop, "value");
        Py_DECREF(stop);
        if (result != NULL) {
            status = PYGEN_RETURN;
        }
    }
    status = call_over(self, status, &result);
    self->stepping = 0;
    return stepped(status, result);
}

static PyObject *
Call_close(Call *self, PyObject *unused)
{
    PyObject *method, *closed, *result = NULL;
    if (call_busy(self)) {
        return NULL;
    }
    if (self->state != CALL_RUNNING) {
        call_release(self);
        Py_RETURN_NONE;
    }
    self->stepping = 1;
    method = method_of(self->inner, "close");
    if (method != NULL) {
        closed = PyObject_CallNoArgs(method);
        Py_DECREF(method);
        if (closed != NULL) {
            Py_DECREF(closed);
            PyErr_SetNone(PyExc_GeneratorExit);
        }
    }
    else if (!PyErr_Occurred()) {
        PyErr_SetNone(PyExc_GeneratorExit);
    }
    call_over(self, PYGEN_ERROR, &result);
    self->stepping = 0;
    if (PyErr_ExceptionMatches(PyExc_GeneratorExit)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

static PyObject *
Call_await(Call *self)
{
    if (self->state == CALL_RUNNING) { /* as `await` refuses a coroutine suspended in one */
        PyErr_SetString(PyExc_RuntimeError, "coroutine is being awaited already");
        return NULL;
    }
    return Py_NewRef(self);
}

static PyObject *
Call_get_await(Call *self, void *unused)
{
    return Py_NewRef(self->inner == NULL ? Py_None : self->inner);
}

static PyObject *
Call_get_running(Call *self, void *unused)
{
    return PyBool_FromLong(self->stepping);
}

static PyObject *
Call_get_suspended(Call *self, void *unused)
{
    return PyBool_FromLong(self->state == CALL_RUNNING && !self->stepping);
}

static PyObject *
Call_get_frame(Call *self, void *unused)
{
    Py_RETURN_NONE; /* no Python frame of its own */
}

static PyObject *
Call_get_name(Call *self, void *unused)
{
    return PyUnicode_FromString("__call__");
}

static PyObject *
Call_get_qualname(Call *self, void *unused)
{
    PyObject *name, *made;
    if (self->middleware == NULL) { /* over: the frame's hold on it let go */
        return PyUnicode_FromString("__call__");
    }
    name = PyObject_GetAttrString((PyObject *)Py_TYPE(self->middleware), "__qualname__");
    if (name == NULL) {
        return NULL;
    }
    made = PyUnicode_FromFormat("%S.__call__", name);
    Py_DECREF(name);
    return made;
}

/* A Call dropped unfinished is closed, as a coroutine is; one never started warns as one. */
static void
Call_finalize(Call *self)
{
    PyObject *error = take_error(), *closed;
    if (self->state == CALL_NEW && self->middleware != NULL) {
        self->state = CALL_DONE;
        if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1, "coroutine '%.100s.__call__' was never "
                             "awaited", Py_TYPE(self->middleware)->tp_name) < 0) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
    }
    else if (self->state == CALL_RUNNING) {
        closed = Call_close(self, NULL);
        if (closed == NULL) {
            PyErr_WriteUnraisable((PyObject *)self);
        }
        Py_XDECREF(closed);
    }
    if (error != NULL) {
        give_error(error);
    }
}

static int
Call_traverse(Call *self, visitproc visit, void *arg)
{
    Py_VISIT(self->middleware);
    Py_VISIT(self->scope);
    Py_VISIT(self->receive);
    Py_VISIT(self->send);
    Py_VISIT(self->inner);
    Py_VISIT(self->reply);
    return 0;
}

static int
Call_clear(Call *self)
{
    Py_CLEAR(self->middleware);
    Py_CLEAR(self->scope);
    Py_CLEAR(self->receive);
    Py_CLEAR(self->send);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->reply);
    return 0;
}

static void
Call_dealloc(Call *self)
{
    if (self->state != CALL_DONE
        && PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return; /* brought back to life by its finaliser */
    }
    PyObject_GC_UnTrack(self);
    Call_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Call_methods[] = {
    {"send", (PyCFunction)Call_send, METH_O, "send(value): a step, as a coroutine's send."},
    {"throw", (PyCFunction)Call_throw, METH_VARARGS,
     "throw(exception): raised where the app is awaited, as a coroutine's throw."},
    {"close", (PyCFunction)Call_close, METH_NOARGS, "As a coroutine's close."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Call_getset[] = {
    {"cr_await", (getter)Call_get_await, NULL, "What it awaits (None before and after).", NULL},
    {"cr_running", (getter)Call_get_running, NULL, "Whether a step is running.", NULL},
    {"cr_suspended", (getter)Call_get_suspended, NULL, "Whether it waits between steps.", NULL},
    {"cr_frame", (getter)Call_get_frame, NULL, "None: it has no Python frame.", NULL},
    {"__qualname__", (getter)Call_get_qualname, NULL, "The middleware's __call__.", NULL},
    {"__name__", (getter)Call_get_name, NULL, "__call__", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyAsyncMethods Call_async = {
    .am_await = (unaryfunc)Call_await,
    .am_send = (sendfunc)Call_am_send,
};

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lbclient.server._counting.Call",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One call of LoadReportingASGI, awaited as its coroutine would be.",
    .tp_as_async = &Call_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)Call_iternext,
    .tp_finalize = (destructor)Call_finalize,
    .tp_dealloc = (destructor)Call_dealloc,
    .tp_traverse = (traverseproc)Call_traverse,
    .tp_clear = (inquiry)Call_clear,
    .tp_methods = Call_methods,
    .tp_getset = Call_getset,
};

static PyObject *
Middleware_call(Middleware *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"scope", "receive", "send", NULL};
    PyObject *scope, *receive, *send;
    Call *call;
    if (kwargs == NULL && PyTuple_GET_SIZE(args) == 3) {
        scope = PyTuple_GET_ITEM(args, 0);
        receive = PyTuple_GET_ITEM(args, 1);
        send = PyTuple_GET_ITEM(args, 2);
    }
    else if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO:__call__", keywords, &scope,
                                          &receive, &send)) {
        return NULL;
    }
    call = PyObject_GC_New(Call, &CallType);
    if (call == NULL) {
        return NULL;
    }
    call->middleware = Py_NewRef(self);
    call->scope = Py_NewRef(scope);
    call->receive = Py_NewRef(receive);
    call->send = Py_NewRef(send);
    call->inner = NULL;
    call->reply = NULL;
    call->state = CALL_NEW;
    call->stepping = 0;
    PyObject_GC_Track(call);
    return (PyObject *)call;
}

static PyObject *
Middleware_get_app(Middleware *self, void *unused)
{
    if (self->app == NULL) {
        PyErr_SetString(PyExc_AttributeError, "app");
        return NULL;
    }
    return Py_NewRef(self->app);
}

static int
Middleware_set_app(Middleware *self, PyObject *value, void *unused)
{
    Py_XSETREF(self->app, Py_XNewRef(value));
    return 0;
}

static PyObject *
Middleware_get_gate(Middleware *self, void *unused)
{
    return Py_NewRef(self->gate == NULL ? Py_None : self->gate);
}

static int
Middleware_set_gate(Middleware *self, PyObject *value, void *unused)
{
    if (value != NULL && value != Py_None && !Py_IS_TYPE(value, &GateType)) {
        PyErr_Format(PyExc_TypeError, "_gate must be a Gate or None, got %R", value);
        return -1;
    }
    Py_XSETREF(self->gate, value == Py_None ? NULL : Py_XNewRef(value));
    return 0;
}

static int
Middleware_traverse(Middleware *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->gate);
    return 0;
}

static int
Middleware_clear(Middleware *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->gate);
    return 0;
}

static void
Middleware_dealloc(Middleware *self)
{
    PyObject_GC_UnTrack(self);
    Middleware_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef Middleware_getset[] = {
    {"app", (getter)Middleware_get_app, (setter)Middleware_set_app, "The app called.", NULL},
    {"_gate", (getter)Middleware_get_gate, (setter)Middleware_set_gate,
     "The compiled path's Gate, or None: every request takes the Python path.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MiddlewareType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lbclient.server._counting.Middleware",
    .tp_basicsize = sizeof(Middleware),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "LoadReportingASGI's base: calling it makes a Call (see the module's account).",
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)Middleware_call,
    .tp_dealloc = (destructor)Middleware_dealloc,
    .tp_traverse = (traverseproc)Middleware_traverse,
    .tp_clear = (inquiry)Middleware_clear,
    .tp_getset = Middleware_getset,
};

/* ---- the module ------------------------------------------------------------------------- */

static int
intern(PyObject **place, const char *text)
{
    if (*place == NULL) {
        *place = PyUnicode_InternFromString(text);
    }
    return *place == NULL ? -1 : 0;
}

static int
module_exec(PyObject *module)
{
    if (intern(&KEY_TYPE, "type") < 0 || intern(&KEY_STATUS, "status") < 0
        || intern(&KEY_HEADERS, "headers") < 0 || intern(&KEY_PATH, "path") < 0
        || intern(&HTTP, "http") < 0 || intern(&START, START_TEXT) < 0
        || intern(&TEXT, "TEXT") < 0 || intern(&JSON, "JSON") < 0
        || intern(&JOINED, "joined") < 0 || intern(&ENCODED, "encoded") < 0
        || intern(&ENCODED_AT, "_encoded_at") < 0 || intern(&IN_PYTHON, "_in_python") < 0) {
        return -1;
    }
    if (CR_AWAIT == NULL) {
        CR_AWAIT = PyObject_GetAttrString((PyObject *)&PyCoro_Type, "cr_await");
        if (CR_AWAIT == NULL) {
            return -1;
        }
        if (Py_TYPE(CR_AWAIT)->tp_descr_get == NULL) {
            PyErr_SetString(PyExc_TypeError, "coroutine.cr_await is not a descriptor");
            Py_CLEAR(CR_AWAIT);
            return -1;
        }
    }
    if (EMPTY == NULL && (EMPTY = PyTuple_New(0)) == NULL) {
        return -1;
    }
    if (FIVE_HUNDRED == NULL && (FIVE_HUNDRED = PyLong_FromLong(500)) == NULL) {
        return -1;
    }
    if (REPORT_NAME == NULL) {
        REPORT_NAME = PyBytes_FromStringAndSize(REPORT, REPORT_LENGTH);
        if (REPORT_NAME == NULL) {
            return -1;
        }
    }
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&ReplyType) < 0
        || PyType_Ready(&GateType) < 0 || PyType_Ready(&CallType) < 0
        || PyType_Ready(&MiddlewareType) < 0) {
        return -1;
    }
    if (PyModule_AddObjectRef(module, "Counter", (PyObject *)&CounterType) < 0
        || PyModule_AddObjectRef(module, "Reply", (PyObject *)&ReplyType) < 0
        || PyModule_AddObjectRef(module, "Gate", (PyObject *)&GateType) < 0
        || PyModule_AddObjectRef(module, "Call", (PyObject *)&CallType) < 0
        || PyModule_AddObjectRef(module, "Middleware", (PyObject *)&MiddlewareType) < 0
        || PyModule_AddIntConstant(module, "MOST_PER_SLOT", MOST_PER_SLOT) < 0
        || PyModule_AddIntConstant(module, "MOST_WINDOW", MOST_WINDOW) < 0
        || PyModule_AddIntConstant(module, "MOST_RATE_WINDOW", MOST_RATE_WINDOW) < 0
        || PyModule_AddIntConstant(module, "MOST_FOUND", MOST_FOUND) < 0
        || PyModule_AddStringConstant(module, "SOURCE_SHA256", LBCLIENT_SOURCE_SHA256) < 0) {
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef definition = {
    PyModuleDef_HEAD_INIT,
    "lbclient.server._counting",
    "The compiled per-request path of the server companion (see lbclient.server._asgi).",
    0,
    NULL,
    slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__counting(void)
{
    return PyModuleDef_Init(&definition);
}
