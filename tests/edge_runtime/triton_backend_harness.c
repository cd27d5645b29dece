/* A stand-in for tritonserver's side of the backend API, to drive edgeloop's Triton backend (backend.c) through
 * what a real tritonserver cannot produce here: an input in GPU memory (a client's CUDA shared memory needs a GPU),
 * one in pinned host memory, a response Triton fails to make, a batched model with no inputs, another backend API
 * version. Everything else about the backend is tested against the real tritonserver (test_triton.py).
 *
 * It implements the TRITONBACKEND_* and TRITONSERVER_* functions the backend imports (exported with -rdynamic; the
 * backend is dlopen'ed as Triton does) and enforces the contract tritonbackend.h documents for them:
 *   - TRITONBACKEND_InputBuffer: index < buffer_count (else an error); memory_type is in/out: the caller says what
 *     it prefers, the input's real type comes back. A GPU buffer's address is one that is not mapped, so a backend
 *     that reads it crashes this process (as reading device memory from the host crashes tritonserver).
 *   - a request gets exactly one response with the FINAL flag, before it is released exactly once; a request
 *     released unanswered (its client would wait for ever), answered twice or released twice is a violation.
 *   - TRITONBACKEND_ResponseSend takes the response; the error passed to it stays the caller's.
 * Output: one line per event ("initialize: ok", "request 1: error 3 <message>", "request 0: ok y=-1,-2,-3");
 * exit 3 on a contract violation.
 *
 *   harness BACKEND.so BACKEND_DIR MODEL_DIR CONFIG_JSON SCENARIO [API_MAJOR API_MINOR]
 *   SCENARIO: api (initialize only), memory, noresponse, noinputs
 */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct TRITONSERVER_Error { int code; char* message; } TRITONSERVER_Error;
typedef struct TRITONSERVER_Message { char* json; } TRITONSERVER_Message;
typedef struct TRITONBACKEND_Input {
    const char* name;
    int datatype;
    int64_t shape[4];
    uint32_t dims;
    uint64_t byte_size;
    int memory_type;
    const void* data;
} TRITONBACKEND_Input;
typedef struct TRITONBACKEND_Request {
    int id;
    TRITONBACKEND_Input inputs[2];
    int n_inputs;
    int responses;
    int released;
    int fail_response_new; /* how many ResponseNew calls for it fail */
} TRITONBACKEND_Request;
typedef struct TRITONBACKEND_Output {
    char name[64];
    float* buffer;
    uint64_t size;
} TRITONBACKEND_Output;
typedef struct TRITONBACKEND_Response {
    TRITONBACKEND_Request* request;
    TRITONBACKEND_Output outputs[4];
    int n_outputs;
} TRITONBACKEND_Response;
typedef struct TRITONBACKEND_Backend { const char* location; } TRITONBACKEND_Backend;
typedef struct TRITONBACKEND_Model { const char* location; const char* config; } TRITONBACKEND_Model;
typedef struct TRITONBACKEND_ModelInstance { TRITONBACKEND_Model* model; void* state; } TRITONBACKEND_ModelInstance;

enum { ERROR_UNKNOWN, ERROR_INTERNAL, ERROR_NOT_FOUND, ERROR_INVALID_ARG, ERROR_UNAVAILABLE, ERROR_UNSUPPORTED };
enum { MEMORY_CPU, MEMORY_CPU_PINNED, MEMORY_GPU };
static uint32_t api_major = 1, api_minor = 19;
static int violations;

TRITONSERVER_Error* TRITONSERVER_ErrorNew(int code, const char* message) {
    TRITONSERVER_Error* e = malloc(sizeof *e);
    e->code = code;
    e->message = strdup(message ? message : "");
    return e;
}
void TRITONSERVER_ErrorDelete(TRITONSERVER_Error* e) {
    if (!e) return;
    free(e->message);
    free(e);
}
TRITONSERVER_Error* TRITONSERVER_MessageSerializeToJson(TRITONSERVER_Message* m, const char** base, size_t* size) {
    *base = m->json;
    *size = strlen(m->json);
    return NULL;
}
TRITONSERVER_Error* TRITONSERVER_MessageDelete(TRITONSERVER_Message* m) {
    free(m->json);
    free(m);
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ApiVersion(uint32_t* major, uint32_t* minor) {
    *major = api_major;
    *minor = api_minor;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_BackendArtifacts(TRITONBACKEND_Backend* b, int* type, const char** location) {
    *type = 0;
    *location = b->location;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelConfig(TRITONBACKEND_Model* model, uint32_t version,
                                              TRITONSERVER_Message** config) {
    if (version != 1) return TRITONSERVER_ErrorNew(ERROR_UNSUPPORTED, "config version");
    *config = malloc(sizeof **config);
    (*config)->json = strdup(model->config);
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelRepository(TRITONBACKEND_Model* model, int* type, const char** location) {
    *type = 0;
    *location = model->location;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelVersion(TRITONBACKEND_Model* model, uint64_t* version) {
    (void)model;
    *version = 1;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceModel(TRITONBACKEND_ModelInstance* i, TRITONBACKEND_Model** model) {
    *model = i->model;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceState(TRITONBACKEND_ModelInstance* i, void** state) {
    *state = i->state;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceSetState(TRITONBACKEND_ModelInstance* i, void* state) {
    i->state = state;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_RequestInput(TRITONBACKEND_Request* r, const char* name,
                                               TRITONBACKEND_Input** input) {
    for (int k = 0; k < r->n_inputs; k++)
        if (!strcmp(r->inputs[k].name, name)) {
            *input = &r->inputs[k];
            return NULL;
        }
    return TRITONSERVER_ErrorNew(ERROR_NOT_FOUND, "no such input");
}
TRITONSERVER_Error* TRITONBACKEND_InputProperties(TRITONBACKEND_Input* in, const char** name, int* datatype,
                                                  const int64_t** shape, uint32_t* dims, uint64_t* byte_size,
                                                  uint32_t* buffer_count) {
    if (name) *name = in->name;
    if (datatype) *datatype = in->datatype;
    if (shape) *shape = in->shape;
    if (dims) *dims = in->dims;
    if (byte_size) *byte_size = in->byte_size;
    if (buffer_count) *buffer_count = 1;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_InputBuffer(TRITONBACKEND_Input* in, uint32_t index, const void** buffer,
                                              uint64_t* size, int* memory_type, int64_t* memory_type_id) {
    if (index >= 1) return TRITONSERVER_ErrorNew(ERROR_INVALID_ARG, "buffer index out of range");
    *buffer = in->data;
    *size = in->byte_size;
    *memory_type = in->memory_type; /* what the input really is, whatever the caller preferred */
    *memory_type_id = 0;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_RequestRelease(TRITONBACKEND_Request* r, uint32_t flags) {
    (void)flags;
    if (r->released++ || r->responses != 1) {
        printf("violation: request %d released (%d times) with %d responses\n", r->id, r->released, r->responses);
        violations++;
    }
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ResponseNew(TRITONBACKEND_Response** response, TRITONBACKEND_Request* r) {
    if (r->fail_response_new > 0) {
        r->fail_response_new--;
        return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "out of memory (harness)");
    }
    *response = calloc(1, sizeof **response);
    (*response)->request = r;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ResponseOutput(TRITONBACKEND_Response* response, TRITONBACKEND_Output** output,
                                                 const char* name, int datatype, const int64_t* shape,
                                                 uint32_t dims) {
    (void)datatype, (void)shape, (void)dims;
    if (response->n_outputs == 4) return TRITONSERVER_ErrorNew(ERROR_INTERNAL, "too many outputs");
    *output = &response->outputs[response->n_outputs++];
    snprintf((*output)->name, sizeof (*output)->name, "%s", name);
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_OutputBuffer(TRITONBACKEND_Output* output, void** buffer, uint64_t size,
                                               int* memory_type, int64_t* memory_type_id) {
    output->buffer = malloc(size ? size : 1);
    output->size = size;
    *buffer = output->buffer;
    *memory_type = MEMORY_CPU;
    *memory_type_id = 0;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ResponseSend(TRITONBACKEND_Response* response, uint32_t flags,
                                               TRITONSERVER_Error* error) {
    TRITONBACKEND_Request* r = response->request;
    if (flags != 1 || r->released) {
        printf("violation: request %d answered without FINAL or after its release\n", r->id);
        violations++;
    }
    if (++r->responses > 1) {
        printf("violation: request %d answered %d times\n", r->id, r->responses);
        violations++;
    }
    if (error) {
        printf("request %d: error %d %s\n", r->id, error->code, error->message);
    } else {
        printf("request %d: ok", r->id);
        for (int o = 0; o < response->n_outputs; o++) {
            printf(" %s=", response->outputs[o].name);
            for (uint64_t v = 0; v < response->outputs[o].size / sizeof(float); v++)
                printf("%s%g", v ? "," : "", response->outputs[o].buffer[v]);
        }
        printf("\n");
    }
    for (int o = 0; o < response->n_outputs; o++) free(response->outputs[o].buffer);
    free(response);
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportStatistics(TRITONBACKEND_ModelInstance* i,
                                                                TRITONBACKEND_Request* r, bool success, uint64_t a,
                                                                uint64_t b, uint64_t c, uint64_t d) {
    (void)i, (void)r, (void)success, (void)a, (void)b, (void)c, (void)d;
    return NULL;
}
TRITONSERVER_Error* TRITONBACKEND_ModelInstanceReportBatchStatistics(TRITONBACKEND_ModelInstance* i, uint64_t n,
                                                                     uint64_t a, uint64_t b, uint64_t c,
                                                                     uint64_t d) {
    (void)i, (void)n, (void)a, (void)b, (void)c, (void)d;
    return NULL;
}

typedef TRITONSERVER_Error* (*InitializeFn)(TRITONBACKEND_Backend*);
typedef TRITONSERVER_Error* (*InstanceFn)(TRITONBACKEND_ModelInstance*);
typedef TRITONSERVER_Error* (*ExecuteFn)(TRITONBACKEND_ModelInstance*, TRITONBACKEND_Request**, uint32_t);

static bool said(const char* what, TRITONSERVER_Error* err) {
    if (err) printf("%s: error %d %s\n", what, err->code, err->message);
    else printf("%s: ok\n", what);
    TRITONSERVER_ErrorDelete(err);
    return err == NULL;
}

/* A request with one FP32 input "x" of shape [1, 3] holding ``data`` in memory of ``memory_type``. */
static void request_x(TRITONBACKEND_Request* r, int id, const float* data, int memory_type) {
    memset(r, 0, sizeof *r);
    r->id = id;
    r->n_inputs = 1;
    r->inputs[0] = (TRITONBACKEND_Input){.name = "x", .datatype = 11, .shape = {1, 3}, .dims = 2,
                                         .byte_size = 3 * sizeof(float), .memory_type = memory_type,
                                         .data = data};
}

int main(int argc, char** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s BACKEND.so BACKEND_DIR MODEL_DIR CONFIG_JSON SCENARIO [MAJOR MINOR]\n", argv[0]);
        return 2;
    }
    if (argc >= 8) api_major = (uint32_t)atoi(argv[6]), api_minor = (uint32_t)atoi(argv[7]);
    setvbuf(stdout, NULL, _IONBF, 0); /* every line is out before a crash */
    void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL); /* as Triton opens backends */
    if (!library) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 2;
    }
    InitializeFn initialize = (InitializeFn)dlsym(library, "TRITONBACKEND_Initialize");
    InstanceFn instance_init = (InstanceFn)dlsym(library, "TRITONBACKEND_ModelInstanceInitialize");
    InstanceFn instance_fini = (InstanceFn)dlsym(library, "TRITONBACKEND_ModelInstanceFinalize");
    ExecuteFn execute = (ExecuteFn)dlsym(library, "TRITONBACKEND_ModelInstanceExecute");
    TRITONBACKEND_Backend backend = {argv[2]};
    TRITONBACKEND_Model model = {argv[3], argv[4]};
    TRITONBACKEND_ModelInstance instance = {&model, NULL};
    const char* scenario = argv[5];
    if (!said("initialize", initialize(&backend)) || !strcmp(scenario, "api")) return violations ? 3 : 0;
    if (!said("instance", instance_init(&instance))) return 1;

    static const float a[3] = {1, 2, 3}, b[3] = {4, 5, 6}, c[3] = {7, 8, 9};
    TRITONBACKEND_Request requests[3];
    TRITONBACKEND_Request* handed[3] = {&requests[0], &requests[1], &requests[2]};
    uint32_t count = 0;
    if (!strcmp(scenario, "memory")) { /* host, device (never to be read: an unmapped address), pinned host */
        request_x(&requests[0], 0, a, MEMORY_CPU);
        request_x(&requests[1], 1, (const float*)(uintptr_t)0x10, MEMORY_GPU);
        request_x(&requests[2], 2, c, MEMORY_CPU_PINNED);
        count = 3;
    } else if (!strcmp(scenario, "noresponse")) { /* Triton fails to make request 0's first response */
        request_x(&requests[0], 0, a, MEMORY_CPU);
        request_x(&requests[1], 1, b, MEMORY_CPU);
        requests[0].fail_response_new = 1;
        count = 2;
    } else if (!strcmp(scenario, "noinputs")) {
        memset(requests, 0, sizeof requests);
        requests[0].id = 0, requests[1].id = 1;
        count = 2;
    } else {
        fprintf(stderr, "unknown scenario %s\n", scenario);
        return 2;
    }
    said("execute", execute(&instance, handed, count));
    for (uint32_t r = 0; r < count; r++)
        if (!requests[r].released) {
            printf("violation: request %d never released\n", r);
            violations++;
        }
    said("finalize", instance_fini(&instance));
    return violations ? 3 : 0;
}
