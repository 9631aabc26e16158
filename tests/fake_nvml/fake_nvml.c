/*
 * A fake libnvidia-ml.so for tests on machines without an NVIDIA driver.
 *
 * It exports only the NVML functions gpulease calls (nvml-wrapper resolves
 * symbols one by one, so nothing else is needed) and answers from a text
 * file named by the environment variable FAKE_NVML_STATE, re-read on every
 * call, so that a test can change the "GPU" while the broker runs:
 *
 *   # comments and blank lines are ignored
 *   gpu  INDEX UUID TOTAL_MIB USED_MIB NAME...
 *   proc GPU_INDEX PID USED_MIB
 *
 * Free memory is TOTAL_MIB - USED_MIB. Write the file atomically (write a
 * temporary file, then rename it) so that a reader never sees half of it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};

typedef struct {
    unsigned int version;
    unsigned long long total;
    unsigned long long reserved;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_v2_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

#define MAX_GPUS 16
#define MAX_PROCS 256
#define MIB (1024ULL * 1024ULL)

struct gpu {
    unsigned int index;
    char uuid[96];
    char name[96];
    unsigned long long total_mib, used_mib;
};

struct proc {
    unsigned int gpu, pid;
    unsigned long long used_mib;
};

struct state {
    unsigned int gpus, procs;
    struct gpu gpu[MAX_GPUS];
    struct proc proc[MAX_PROCS];
};

static int initialised;

static int load(struct state *s) {
    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f;
    char line[512];
    memset(s, 0, sizeof *s);
    if (!path || !(f = fopen(path, "r")))
        return -1;
    while (fgets(line, sizeof line, f)) {
        struct gpu g;
        struct proc p;
        int name_at = 0;
        memset(&g, 0, sizeof g);
        if (sscanf(line, "gpu %u %95s %llu %llu %n", &g.index, g.uuid, &g.total_mib,
                   &g.used_mib, &name_at) == 4 && s->gpus < MAX_GPUS) {
            strncpy(g.name, line + name_at, sizeof g.name - 1);
            g.name[strcspn(g.name, "\r\n")] = 0;
            s->gpu[s->gpus++] = g;
        } else if (sscanf(line, "proc %u %u %llu", &p.gpu, &p.pid, &p.used_mib) == 3 &&
                   s->procs < MAX_PROCS) {
            s->proc[s->procs++] = p;
        }
    }
    fclose(f);
    return 0;
}

/* Handles are index + 1, so that no handle is NULL. */
static int device(nvmlDevice_t handle, struct state *s, struct gpu **g) {
    uintptr_t index = (uintptr_t)handle;
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    if (load(s) != 0)
        return NVML_ERROR_UNKNOWN;
    if (index == 0 || index > s->gpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    *g = &s->gpu[index - 1];
    return NVML_SUCCESS;
}

static nvmlReturn_t copy(char *out, unsigned int length, const char *text) {
    if (!out || strlen(text) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    struct state s;
    if (load(&s) != 0)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    initialised = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) {
    initialised = 0;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded (fake: FAKE_NVML_STATE unreadable)";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct state s;
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s) != 0)
        return NVML_ERROR_UNKNOWN;
    *count = s.gpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *handle) {
    struct state s;
    if (!initialised)
        return NVML_ERROR_UNINITIALIZED;
    if (!handle)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (load(&s) != 0)
        return NVML_ERROR_UNKNOWN;
    if (index >= s.gpus)
        return NVML_ERROR_INVALID_ARGUMENT;
    *handle = (nvmlDevice_t)(uintptr_t)(index + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t handle, char *name, unsigned int length) {
    struct state s;
    struct gpu *g;
    int rc = device(handle, &s, &g);
    return rc ? rc : copy(name, length, g->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t handle, char *uuid, unsigned int length) {
    struct state s;
    struct gpu *g;
    int rc = device(handle, &s, &g);
    return rc ? rc : copy(uuid, length, g->uuid);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t handle, nvmlMemory_v2_t *memory) {
    struct state s;
    struct gpu *g;
    int rc = device(handle, &s, &g);
    if (rc)
        return rc;
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = g->total_mib * MIB;
    memory->reserved = 0;
    memory->used = g->used_mib * MIB;
    memory->free = g->used_mib < g->total_mib ? (g->total_mib - g->used_mib) * MIB : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t handle, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    struct state s;
    struct gpu *g;
    unsigned int i, n = 0, capacity;
    int rc = device(handle, &s, &g);
    if (rc)
        return rc;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < s.procs; i++)
        n += s.proc[i].gpu == g->index;
    capacity = *count;
    *count = n;
    if (n == 0)
        return NVML_SUCCESS;
    if (!infos || capacity < n)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    for (i = 0, n = 0; i < s.procs; i++) {
        if (s.proc[i].gpu != g->index)
            continue;
        infos[n].pid = s.proc[i].pid;
        infos[n].usedGpuMemory = s.proc[i].used_mib * MIB;
        infos[n].gpuInstanceId = 0xFFFFFFFF;
        infos[n].computeInstanceId = 0xFFFFFFFF;
        n++;
    }
    return NVML_SUCCESS;
}
