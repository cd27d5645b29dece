/* edgeloop's Triton backend: runs the ONNX Runtime engine edgeloop built and validated inside tritonserver itself.
 *
 * Triton's Python backend runs a model in a stub process and moves every request and response through shared
 * memory and a wake-up of each process; on one CPU core that costs about as much as the model. This backend embeds
 * the Python interpreter instead (the one of the virtualenv in EDGELOOP_TRITON_PYTHON, else the one it was built
 * against) and calls edgeloop_engine.py once per formed batch: the inputs of the requests Triton's dynamic batcher
 * hands over are copied into one buffer here, ONNX Runtime runs them as one batch (it releases the GIL while it
 * runs), and the outputs are split back into one response per request. When that run fails, each request runs
 * alone, so that only the request at fault gets an error (INVALID_ARG when ONNX Runtime blames the input, INTERNAL
 * otherwise).
 *
 * It needs only Triton's C backend API, of which it declares the part it calls (from tritonbackend.h and
 * tritonserver.h, API version 1.x: opaque handles, int-sized enums), and Python's C API. Because it declares them
 * itself, TRITONBACKEND_Initialize checks TRITONBACKEND_ApiVersion first, as tritonbackend.h tells backends to: the
 * same major version, and a minor no older than the one these declarations were written against (1.19: Triton
 * 2.49, NGC 24.08; they match the headers of 2.49, 2.51 and main), else it refuses to load, in one line.
 *
 * Every request gets a response or an error: an input in GPU memory (a client's CUDA shared memory) is refused
 * with INVALID_ARG and never read (this backend runs on the CPU), one in pinned host memory is copied; a request
 * whose response could not be made is answered with an error at the end of the execution.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* --- the part of Triton's backend API this backend calls ------------------------------------------------------- */
typedef struct TRITONSERVER_Error TRITONSERVER_Error;
typedef struct TRITONSERVER_Message TRITONSERVER_Message;
typedef struct TRITONBACKEND_Backend TRITONBACKEND_Backend;
typedef struct TRITONBACKEND_Model TRITONBACKEND_Model;
typedef struct TRITONBACKEND_ModelInstance TRITONBACKEND_ModelInstance;
typedef struct TRITONBACKEND_Request TRITONBACKEND_Request;
typedef struct TRITONBACKEND_Response TRITONBACKEND_Response;
typedef struct TRITONBACKEND_Input TRITONBACKEND_Input;
typedef struct TRITONBACKEND_Output TRITONBACKEND_Output;

enum { ERROR_UNKNOWN, ERROR_INTERNAL, ERROR_NOT_FOUND, ERROR_INVALID_ARG, ERROR_UNAVAILABLE, ERROR_UNSUPPORTED };
enum { MEMORY_CPU, MEMORY_CPU_PINNED, MEMORY_GPU };
enum { REQUEST_RELEASE_ALL = 1 };
enum { RESPONSE_COMPLETE_FINAL = 1 };

/* The backend API version these declarations were written against (tritonbackend.h). A build may claim another
 * (-DEDGELOOP_API_MINOR=...): the tests do, to see the refusal. */
#define EDGELOOP_API_MAJOR 1
#ifndef EDGELOOP_API_MINOR
#define EDGELOOP_API_MINOR 19
#endif

extern TRITONSERVER_Error* TRITONBACKEND_ApiVersion(uint32_t* major, uint32_t* minor);

extern TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* msg);
extern void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* message, const char** base,
                                                               size_t* byte_size);
extern TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* message);
extern TRITONSERVER_Error* TRITONBACKEND_BackendArtifacts(TRITONBACKEND_Backend* backend, int* artifact_type,
                                                          const char** location);
extern TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model, uint32_t config_version,
                                                     TRITONSERVER_Message** model_config);
extern TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model, int* artifact_type,
                                                         const char** location);
extern TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model, uint64_t* version);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(TRITONBACKEND_ModelInstance* instance,
                                                            TRITONBACKEND_Model** model);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceState(TRITONBACKEND_ModelInstance* instance, void** state);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceSetState(TRITONBACKEND_ModelInstance* instance, void* state);
extern TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* request, const char* name,
                                                      TRITONBACKEND_Input** input);
extern TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* input, const char** name,
                                                         int* datatype, const int64_t** shape, uint32_t* dims_count,
                                                         uint64_t* byte_size, uint32_t* buffer_count);
extern TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* input, uint32_t index, const void** buffer,
                                                     uint64_t* buffer_byte_size, int* memory_type,
                                                     int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* request, uint32_t release_flags);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseNew(TRITONBACKEND_Response** response,
                                                     TRITONBACKEND_Request* request);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response,
                                                        TRITONBACKEND_Output** output, const char* name, int datatype,
                                                        const int64_t* shape, uint32_t dims_count);
extern TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output, void** buffer,
                                                      uint64_t buffer_byte_size, int* memory_type,
                                                      int64_t* memory_type_id);
extern TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response, uint32_t send_flags,
                                                      TRITONSERVER_Error* error);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(
    TRITONBACKEND_ModelInstance* instance, TRITONBACKEND_Request* request, bool success, uint64_t exec_start_ns,
    uint64_t compute_start_ns, uint64_t compute_end_ns, uint64_t exec_end_ns);
extern TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(
    TRITONBACKEND_ModelInstance* instance, uint64_t batch_size, uint64_t exec_start_ns, uint64_t compute_start_ns,
    uint64_t compute_end_ns, uint64_t exec_end_ns);

#define MAX_DIMS 16
#define MAX_TENSORS 64 /* inputs, and outputs, of one model */

/* --- helpers -------------------------------------------------------------------------------------------------- */
static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The pending Python exception as a Triton error (the caller holds the GIL). */
static TRITONSERVER_Error* python_error(const char* what) {
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    PyObject* text = value ? PyObject_Str(value) : NULL;
    const char* detail = text ? PyUnicode_AsUTF8(text) : NULL;
    char message[1024];
    snprintf(message, sizeof message, "edgeloop backend: %s: %s", what, detail ? detail : "unknown Python error");
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    return TRITONSERVER_ErrorNew(ERROR_INTERNAL, message);
}

/* --- the backend: one interpreter for the process -------------------------------------------------------------- */
static PyObject* engine_module; /* edgeloop_engine.py, imported once */

TRITONSERVER_Error* TRITONBACKEND_Initialize(TRITONBACKEND_Backend* backend) {
    int artifact_type;
    const char* location;
    uint32_t major = 0, minor = 0;
    TRITONSERVER_Error* err = TRITONBACKEND_ApiVersion(&major, &minor);
    if (err) return err;
    if (major != EDGELOOP_API_MAJOR || minor < EDGELOOP_API_MINOR) {
        char message[512];
        snprintf(message, sizeof message, "edgeloop backend: this Triton's backend API is %u.%u, the backend was "
                 "written for %d.%d (the same major, that minor or newer): serve through Triton's onnxruntime or "
                 "python backend (EDGE_TRITON_BACKEND=auto)", major, minor, EDGELOOP_API_MAJOR, EDGELOOP_API_MINOR);
        return TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, message);
    }
    err = TRITONBACKEND_BackendArtifacts(backend, &artifact_type, &location);
    if (err) return err;
    /* numpy's and ONNX Runtime's extension modules look for Python's symbols globally: Triton opened this library
     * (and the libpython it needs) with local symbols. */
    if (!dlopen(EDGELOOP_LIBPYTHON, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD))
        return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: cannot make " EDGELOOP_LIBPYTHON " global");
    bool started = !Py_IsInitialized();
    PyGILState_STATE gil = PyGILState_UNLOCKED;
    if (started) {
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0; /* tritonserver's SIGTERM and SIGINT stay its own */
        config.parse_argv = 0;
        const char* python = getenv("EDGELOOP_TRITON_PYTHON"); /* a virtualenv's interpreter: its site-packages */
        PyStatus status = python && *python ? PyConfig_SetBytesString(&config, &config.executable, python)
                                            : PyStatus_Ok();
        if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) {
            char message[512];
            snprintf(message, sizeof message, "edgeloop backend: Python did not start: %s",
                     status.err_msg ? status.err_msg : "unknown error");
            return TRITONSERVER_ErrorNew(ERROR_INTERNAL, message);
        }
    } else {
        gil = PyGILState_Ensure();
    }
    PyObject* path = PySys_GetObject("path"); /* borrowed */
    PyObject* folder = PyUnicode_FromString(location);
    if (path && folder) PyList_Insert(path, 0, folder);
    Py_XDECREF(folder);
    engine_module = PyImport_ImportModule("edgeloop_engine");
    err = engine_module ? NULL : python_error("cannot import edgeloop_engine.py");
    if (started)
        PyEval_SaveThread(); /* the instances' threads take the GIL in turn */
    else
        PyGILState_Release(gil);
    return err;
}

/* --- one model instance: an edgeloop_engine.Engine and what is known of its tensors ------------------------------- */
typedef struct {
    PyObject* engine;
    bool batched;
    Py_ssize_t n_inputs, n_outputs;
    const char** input_names;  /* owned by the engine's Python strings */
    const char** output_names;
    int* output_types;         /* TRITONSERVER_DataType */
    void** scratch;            /* per input: where the requests' inputs are merged */
    size_t* scratch_size;
} Instance;

static void instance_free(Instance* s) {
    if (!s) return;
    free(s->input_names);
    free(s->output_names);
    free(s->output_types);
    if (s->scratch)
        for (Py_ssize_t i = 0; i < s->n_inputs; i++) free(s->scratch[i]);
    free(s->scratch);
    free(s->scratch_size);
    if (s->engine) {
        PyGILState_STATE gil = PyGILState_Ensure();
        Py_DECREF(s->engine);
        PyGILState_Release(gil);
    }
    free(s);
#ifdef __GLIBC__
    malloc_trim(0); /* an unloaded version's session goes back to the system, not to the heap's free lists */
#endif
}

/* Fill ``s`` from the engine's ``inputs`` (names), ``outputs`` ((name, datatype) pairs) and ``batched``. */
static bool read_signature(Instance* s) {
    PyObject* inputs = PyObject_GetAttrString(s->engine, "inputs");
    PyObject* outputs = PyObject_GetAttrString(s->engine, "outputs");
    PyObject* batched = PyObject_GetAttrString(s->engine, "batched");
    bool ok = inputs && outputs && batched && PyList_Check(inputs) && PyList_Check(outputs);
    if (ok) {
        s->batched = PyObject_IsTrue(batched) == 1;
        s->n_inputs = PyList_GET_SIZE(inputs);
        s->n_outputs = PyList_GET_SIZE(outputs);
        s->input_names = calloc(s->n_inputs + 1, sizeof *s->input_names);
        s->scratch = calloc(s->n_inputs + 1, sizeof *s->scratch);
        s->scratch_size = calloc(s->n_inputs + 1, sizeof *s->scratch_size);
        s->output_names = calloc(s->n_outputs + 1, sizeof *s->output_names);
        s->output_types = calloc(s->n_outputs + 1, sizeof *s->output_types);
        ok = s->input_names && s->scratch && s->scratch_size && s->output_names && s->output_types;
        for (Py_ssize_t i = 0; ok && i < s->n_inputs; i++)
            ok = (s->input_names[i] = PyUnicode_AsUTF8(PyList_GET_ITEM(inputs, i))) != NULL;
        for (Py_ssize_t i = 0; ok && i < s->n_outputs; i++) {
            PyObject* pair = PyList_GET_ITEM(outputs, i);
            ok = PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2 &&
                 (s->output_names[i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pair, 0))) != NULL;
            if (ok) s->output_types[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(pair, 1));
        }
    }
    Py_XDECREF(inputs);  /* the names live as long as the engine holds these lists */
    Py_XDECREF(outputs);
    Py_XDECREF(batched);
    return ok && !PyErr_Occurred();
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceInitialize(TRITONBACKEND_ModelInstance* instance) {
    TRITONBACKEND_Model* model;
    TRITONSERVER_Message* config;
    const char *location, *json;
    size_t json_size;
    int artifact_type;
    uint64_t version;
    TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceModel(instance, &model);
    if (!err) err = TRITONBACKEND_ModelRepository(model, &artifact_type, &location);
    if (!err) err = TRITONBACKEND_ModelVersion(model, &version);
    if (!err) err = TRITONBACKEND_ModelConfig(model, 1, &config);
    if (err) return err;
    err = TRITONSERVER_MessageSerializeToJson(config, &json, &json_size);
    if (err) {
        TRITONSERVER_MessageDelete(config);
        return err;
    }
    Instance* s = calloc(1, sizeof *s);
    PyGILState_STATE gil = PyGILState_Ensure();
    if (!s) {
        err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: out of memory");
    } else {
        char folder[4096];
        snprintf(folder, sizeof folder, "%s/%llu", location, (unsigned long long)version);
        s->engine = PyObject_CallMethod(engine_module, "Engine", "ss#", folder, json, (Py_ssize_t)json_size);
        if (!s->engine || !read_signature(s)) err = python_error("the engine did not load");
        else if (s->n_inputs == 0) s->batched = false; /* nothing carries a batch axis: each request runs whole */
        else if (s->n_inputs > MAX_TENSORS || s->n_outputs > MAX_TENSORS)
            err = TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "edgeloop backend: more than 64 inputs or outputs");
    }
    PyGILState_Release(gil);
    TRITONSERVER_MessageDelete(config);
    if (!err) err = TRITONBACKEND_ModelInstanceSetState(instance, s);
    if (err) instance_free(s);
    return err;
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceFinalize(TRITONBACKEND_ModelInstance* instance) {
    void* s;
    TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &s);
    if (!err) instance_free((Instance*)s);
    return err;
}

/* --- execution ------------------------------------------------------------------------------------------------- */
typedef struct {
    TRITONBACKEND_Request* request;
    TRITONBACKEND_Input* inputs[MAX_TENSORS];
    const int64_t* shapes[MAX_TENSORS];
    uint32_t dims[MAX_TENSORS];
    uint64_t bytes[MAX_TENSORS];
    uint32_t buffers[MAX_TENSORS];
    bool success;
    bool answered; /* a response (or an error) was sent */
} Pending;

/* Send ``request`` an error response (the caller keeps ``error``); whether it was sent. */
static bool respond_error(TRITONBACKEND_Request* request, TRITONSERVER_Error* error) {
    TRITONBACKEND_Response* response;
    TRITONSERVER_Error* made = TRITONBACKEND_ResponseNew(&response, request);
    if (made) {
        TRITONSERVER_ErrorDelete(made);
        return false;
    }
    TRITONSERVER_Error* sent = TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, error);
    if (sent) TRITONSERVER_ErrorDelete(sent);
    return sent == NULL;
}

/* Every request of ``group`` gets ``error`` (the caller keeps it). */
static void fail_group(Pending** group, size_t n, TRITONSERVER_Error* error) {
    for (size_t r = 0; r < n; r++) group[r]->answered = respond_error(group[r]->request, error);
}

/* Whether input ``k`` of ``p`` can be read here: an input in GPU memory (CUDA shared memory) is refused with
 * INVALID_ARG in ``*err`` and never read; host memory, pinned or not, is read (or copied) as it is. */
static bool in_host_memory(Pending* p, Py_ssize_t k, const char* name, TRITONSERVER_Error** err) {
    for (uint32_t b = 0; b < p->buffers[k]; b++) {
        const void* part;
        uint64_t size;
        int memory_type = MEMORY_CPU; /* what this backend prefers */
        int64_t memory_id = 0;
        *err = TRITONBACKEND_InputBuffer(p->inputs[k], b, &part, &size, &memory_type, &memory_id);
        if (*err) return false;
        if (memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED) {
            char message[512];
            snprintf(message, sizeof message, "edgeloop backend: input %s is in GPU memory (CUDA shared memory); this "
                     "backend runs on the CPU: pass it in the request or in system shared memory", name);
            *err = TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, message);
            return false;
        }
    }
    return true;
}

/* Input ``k`` of ``group`` as one buffer: the request's own when it is alone and in one piece, else merged into
 * the instance's scratch buffer. NULL (and ``*err``) if Triton cannot give it. */
static const void* gather(Instance* s, Pending** group, size_t n, Py_ssize_t k, uint64_t* total,
                          TRITONSERVER_Error** err) {
    *total = 0;
    for (size_t r = 0; r < n; r++) *total += group[r]->bytes[k];
    int memory_type = MEMORY_CPU;
    int64_t memory_id = 0;
    uint64_t size;
    const void* part;
    static char empty[1];
    if (*total == 0) return empty; /* a tensor with no elements */
    if (n == 1 && group[0]->buffers[k] == 1) {
        *err = TRITONBACKEND_InputBuffer(group[0]->inputs[k], 0, &part, &size, &memory_type, &memory_id);
        if (*err) return NULL;
        if (memory_type == MEMORY_CPU) return part;
        /* pinned host memory: copied below, like a tensor in several pieces (GPU memory was refused before) */
    }
    if (s->scratch_size[k] < *total) {
        void* grown = realloc(s->scratch[k], *total);
        if (!grown) {
            *err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: out of memory");
            return NULL;
        }
        s->scratch[k] = grown;
        s->scratch_size[k] = *total;
    }
    char* into = s->scratch[k];
    for (size_t r = 0; r < n; r++)
        for (uint32_t b = 0; b < group[r]->buffers[k]; b++) {
            memory_type = MEMORY_CPU;
            *err = TRITONBACKEND_InputBuffer(group[r]->inputs[k], b, &part, &size, &memory_type, &memory_id);
            if (!*err && memory_type != MEMORY_CPU && memory_type != MEMORY_CPU_PINNED)
                *err = TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "edgeloop backend: an input is in GPU memory");
            if (*err) return NULL;
            if (size > *total - (uint64_t)(into - (char*)s->scratch[k])) {
                *err = TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "edgeloop backend: an input's buffers exceed its size");
                return NULL;
            }
            memcpy(into, part, size);
            into += size;
        }
    return s->scratch[k];
}

/* Copy this request's rows of each output (``rows`` rows from row ``first``) into its response and send it (an
 * error response where an output cannot be made); ``*answered``: whether anything was sent. */
static TRITONSERVER_Error* respond(Instance* s, TRITONBACKEND_Request* request, Py_buffer* views, int64_t first,
                                   int64_t rows, bool* answered) {
    TRITONBACKEND_Response* response;
    *answered = false;
    TRITONSERVER_Error* err = TRITONBACKEND_ResponseNew(&response, request);
    if (err) return err;
    for (Py_ssize_t o = 0; o < s->n_outputs && !err; o++) {
        Py_buffer* v = &views[o];
        int64_t shape[MAX_DIMS];
        for (int d = 0; d < v->ndim; d++) shape[d] = v->shape[d];
        uint64_t size = (uint64_t)v->len, offset = 0;
        if (s->batched) {
            uint64_t row = v->shape[0] ? (uint64_t)v->len / (uint64_t)v->shape[0] : 0;
            shape[0] = rows;
            size = row * (uint64_t)rows;
            offset = row * (uint64_t)first;
        }
        TRITONBACKEND_Output* output;
        void* into;
        int memory_type = MEMORY_CPU;
        int64_t memory_id = 0;
        err = TRITONBACKEND_ResponseOutput(response, &output, s->output_names[o], s->output_types[o], shape,
                                           (uint32_t)v->ndim);
        if (!err) err = TRITONBACKEND_OutputBuffer(output, &into, size, &memory_type, &memory_id);
        if (!err && memory_type == MEMORY_GPU)
            err = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: Triton gave GPU memory for an output");
        if (!err && size) memcpy(into, (const char*)v->buf + offset, size);
    }
    TRITONSERVER_Error* sent = TRITONBACKEND_ResponseSend(response, RESPONSE_COMPLETE_FINAL, err);
    *answered = sent == NULL;
    if (!sent) return err; /* sent: the caller learns whether it was an error */
    if (err) TRITONSERVER_ErrorDelete(err);
    return sent;
}

/* Run ``group`` (requests whose inputs may share one run) through the engine and answer each; a failed run of
 * several is retried one request at a time. Holds the GIL only while Python runs or its outputs are read. Widens
 * [compute_start, compute_end] to cover its runs. */
static void run_group(Instance* s, Pending** group, size_t n, uint64_t* compute_start, uint64_t* compute_end) {
    TRITONSERVER_Error* err = NULL;
    const void* data[MAX_TENSORS];
    uint64_t sizes[MAX_TENSORS];
    int64_t rows = 0;
    for (Py_ssize_t k = 0; k < s->n_inputs && !err; k++) data[k] = gather(s, group, n, k, &sizes[k], &err);
    for (size_t r = 0; r < n && s->batched; r++) rows += group[r]->shapes[0][0];
    if (err) {
        fail_group(group, n, err);
        TRITONSERVER_ErrorDelete(err);
        return;
    }
    if (!*compute_start) *compute_start = now_ns();
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* buffers = PyList_New(s->n_inputs);
    PyObject* shapes = PyList_New(s->n_inputs);
    bool built = buffers && shapes;
    for (Py_ssize_t k = 0; built && k < s->n_inputs; k++) {
        PyObject* shape = PyTuple_New(group[0]->dims[k]);
        for (uint32_t d = 0; shape && d < group[0]->dims[k]; d++) {
            PyObject* dim = PyLong_FromLongLong(d == 0 && s->batched ? rows : group[0]->shapes[k][d]);
            if (!dim) Py_CLEAR(shape);
            else PyTuple_SET_ITEM(shape, d, dim);
        }
        PyObject* buffer = PyMemoryView_FromMemory((char*)data[k], (Py_ssize_t)sizes[k], PyBUF_READ);
        built = shape && buffer;
        if (built) {
            PyList_SET_ITEM(shapes, k, shape);
            PyList_SET_ITEM(buffers, k, buffer);
        } else {
            Py_XDECREF(shape);
            Py_XDECREF(buffer);
        }
    }
    PyObject* result = built ? PyObject_CallMethod(s->engine, "run", "OO", buffers, shapes) : NULL;
    Py_XDECREF(buffers);
    Py_XDECREF(shapes);
    *compute_end = now_ns();
    if (!result) {
        err = python_error("the run failed");
    } else if (PyTuple_Check(result)) { /* (caller's fault, message): the engine refused or failed the run */
        if (n == 1) {
            const char* message = PyUnicode_AsUTF8(PyTuple_GetItem(result, 1));
            err = TRITONSERVER_ErrorNew(PyObject_IsTrue(PyTuple_GetItem(result, 0)) == 1 ? ERROR_INVALID_ARG
                                                                                         : ERROR_INTERNAL,
                                        message ? message : "edgeloop backend: the run failed");
            PyErr_Clear();
        }
    } else {
        Py_buffer views[MAX_TENSORS];
        Py_ssize_t got = 0;
        for (; got < s->n_outputs; got++) {
            PyObject* value = PyList_GetItem(result, got);
            if (!value || PyObject_GetBuffer(value, &views[got], PyBUF_C_CONTIGUOUS) != 0) break;
            if (views[got].ndim > MAX_DIMS || (s->batched && (views[got].ndim < 1 || views[got].shape[0] != rows))) {
                PyBuffer_Release(&views[got]);
                break;
            }
        }
        if (got < s->n_outputs) {
            err = PyErr_Occurred() ? python_error("an output cannot be read")
                                   : TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: an output is not "
                                                                           "one row per sample of the batch");
        } else {
            int64_t first = 0;
            for (size_t r = 0; r < n; r++) {
                int64_t own = s->batched ? group[r]->shapes[0][0] : 0;
                TRITONSERVER_Error* failed = respond(s, group[r]->request, views, first, own, &group[r]->answered);
                group[r]->success = failed == NULL;
                if (failed) TRITONSERVER_ErrorDelete(failed);
                first += own;
            }
        }
        for (Py_ssize_t o = 0; o < got; o++) PyBuffer_Release(&views[o]);
    }
    bool retry = result && PyTuple_Check(result) && n > 1;
    Py_XDECREF(result);
    PyGILState_Release(gil);
    if (retry) /* find the culprit: each request alone */
        for (size_t r = 0; r < n; r++) run_group(s, &group[r], 1, compute_start, compute_end);
    if (err) {
        fail_group(group, n, err);
        TRITONSERVER_ErrorDelete(err);
    }
}

/* Whether request ``r`` has the non-batch shape of request ``first`` in every input. */
static bool same_shape(const Instance* s, const Pending* first, const Pending* r) {
    for (Py_ssize_t k = 0; k < s->n_inputs; k++) {
        if (r->dims[k] != first->dims[k]) return false;
        for (uint32_t d = 1; d < r->dims[k]; d++)
            if (r->shapes[k][d] != first->shapes[k][d]) return false;
    }
    return true;
}

/* A request released without a response leaves its client waiting for ever: any that a failure left unanswered
 * (Triton could not make its response) gets an error now. */
static void answer_the_rest(Pending* pending, uint32_t count) {
    for (uint32_t r = 0; r < count; r++) {
        if (pending[r].answered) continue;
        TRITONSERVER_Error* error = TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: the response to this "
                                                                          "request could not be made");
        pending[r].answered = respond_error(pending[r].request, error);
        TRITONSERVER_ErrorDelete(error);
    }
}

TRITONSERVER_Error* TRITONBACKEND_ModelInstanceExecute(TRITONBACKEND_ModelInstance* instance,
                                                       TRITONBACKEND_Request** requests, uint32_t count) {
    uint64_t exec_start = now_ns();
    void* state;
    TRITONSERVER_Error* err = TRITONBACKEND_ModelInstanceState(instance, &state);
    if (err) return err;
    Instance* s = state;
    Pending* pending = calloc(count, sizeof *pending);
    Pending** group = calloc(count, sizeof *group);
    if (!pending || !group) {
        free(pending);
        free(group);
        return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "edgeloop backend: out of memory");
    }
    size_t ready = 0; /* requests whose inputs Triton could describe */
    for (uint32_t r = 0; r < count; r++) {
        Pending* p = &pending[r];
        p->request = requests[r];
        err = NULL;
        for (Py_ssize_t k = 0; k < s->n_inputs && !err; k++) {
            int datatype;
            err = TRITONBACKEND_RequestInput(p->request, s->input_names[k], &p->inputs[k]);
            if (!err)
                err = TRITONBACKEND_InputProperties(p->inputs[k], NULL, &datatype, &p->shapes[k], &p->dims[k],
                                                    &p->bytes[k], &p->buffers[k]);
            if (!err && (p->dims[k] > MAX_DIMS || (s->batched && p->dims[k] < 1)))
                err = TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "edgeloop backend: an input has no batch axis or more "
                                                               "than 16 dimensions");
            if (!err) in_host_memory(p, k, s->input_names[k], &err);
        }
        if (err) {
            p->answered = respond_error(p->request, err);
            TRITONSERVER_ErrorDelete(err);
        } else {
            group[ready++] = p;
        }
    }
    /* requests that share every non-batch shape run as one batch; any other runs alone */
    bool together = s->batched && ready > 1;
    for (size_t r = 1; together && r < ready; r++) together = same_shape(s, group[0], group[r]);
    uint64_t compute_start = 0, compute_end = 0, samples = 0;
    if (together)
        run_group(s, group, ready, &compute_start, &compute_end);
    else
        for (size_t r = 0; r < ready; r++) run_group(s, &group[r], 1, &compute_start, &compute_end);
    /* Triton's statistics: one execution of what its batcher formed, and each request's outcome */
    uint64_t exec_end = now_ns();
    if (!compute_start) compute_start = compute_end = exec_end;
    for (size_t r = 0; r < ready; r++) samples += s->batched ? (uint64_t)group[r]->shapes[0][0] : 1;
    if (ready) {
        err = TRITONBACKEND_ModelInstanceReportBatchStatistics(instance, samples, exec_start, compute_start,
                                                               compute_end, exec_end);
        if (err) TRITONSERVER_ErrorDelete(err);
    }
    for (uint32_t r = 0; r < count; r++) {
        err = TRITONBACKEND_ModelInstanceReportStatistics(instance, requests[r], pending[r].success, exec_start,
                                                          compute_start, compute_end, exec_end);
        if (err) TRITONSERVER_ErrorDelete(err);
    }
    answer_the_rest(pending, count);
    for (uint32_t r = 0; r < count; r++) {
        TRITONSERVER_Error* released = TRITONBACKEND_RequestRelease(requests[r], REQUEST_RELEASE_ALL);
        if (released) TRITONSERVER_ErrorDelete(released);
    }
    free(pending);
    free(group);
    return NULL;
}
