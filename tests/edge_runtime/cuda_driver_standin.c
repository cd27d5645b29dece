/* A stand-in for the CUDA driver library (libcuda.so.1) where no NVIDIA driver exists: the few driver API calls
 * `edgeloop edge selfcheck` makes, with the signatures and error codes of cuda.h, and the driver's contract enforced
 * (every call before cuInit returns CUDA_ERROR_NOT_INITIALIZED, a bad ordinal CUDA_ERROR_INVALID_DEVICE, a NULL
 * pointer or an unknown attribute CUDA_ERROR_INVALID_VALUE). It describes an Orin NX 16GB on JetPack 6.1 (sm_87,
 * 8 SMs, driver 12.6). STANDIN_CUINIT_ERROR=<code> makes cuInit fail as a driver with no usable GPU does (100:
 * CUDA_ERROR_NO_DEVICE). */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef int CUdevice;
typedef int CUdevice_attribute;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_INITIALIZED = 3,
       CUDA_ERROR_INVALID_DEVICE = 101 };
enum { ATTR_MULTIPROCESSOR_COUNT = 16, ATTR_COMPUTE_CAPABILITY_MAJOR = 75, ATTR_COMPUTE_CAPABILITY_MINOR = 76 };

static int initialized = 0;

CUresult cuInit(unsigned int flags) {
    const char *error = getenv("STANDIN_CUINIT_ERROR");
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE; /* cuda.h: Flags must be 0 */
    if (error != NULL) return atoi(error);
    initialized = 1;
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *version) { /* callable before cuInit, as the real one */
    if (version == NULL) return CUDA_ERROR_INVALID_VALUE;
    *version = 12060;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (count == NULL) return CUDA_ERROR_INVALID_VALUE;
    *count = 1;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice device) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (name == NULL || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    strncpy(name, "Orin", (size_t)len - 1);
    name[len - 1] = '\0';
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (value == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attribute) {
    case ATTR_MULTIPROCESSOR_COUNT: *value = 8; return CUDA_SUCCESS;
    case ATTR_COMPUTE_CAPABILITY_MAJOR: *value = 8; return CUDA_SUCCESS;
    case ATTR_COMPUTE_CAPABILITY_MINOR: *value = 7; return CUDA_SUCCESS;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice device) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (bytes == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (device != 0) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)16 << 30;
    return CUDA_SUCCESS;
}
