/* common.cu: the CUDA plumbing of tltorch._cuda: loading cuBLAS, device queries, the per-device
 * context (a cuBLAS handle created on its device), the current-device guard and the thread's last
 * error text. No kernels and no tensor memory: a context owns only its cuBLAS handle (cuBLAS allocates
 * its own small default workspace inside cublasCreate; calls that pass a workspace use the caller's). */
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_common.h"

/* Per thread, so that a message describes the failure of this thread's call. Long enough for a
 * failed cuBLAS search, which lists the folders it looked in. */
static thread_local char last_error[1536];

void
tl_cuda_set_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

const char *
tl_cuda_last_error(void)
{
    return last_error[0] ? last_error : "no CUDA error recorded";
}

tl_status
tl_cuda_check(cudaError_t err, const char *what)
{
    if (err == cudaSuccess) return TL_OK;
    tl_cuda_set_error("%s: %s: %s (code %d)", what, cudaGetErrorName(err), cudaGetErrorString(err),
                      (int)err);
    /* Clear a non-sticky error so that the next launch check (ours or torch's) does not report it. */
    (void)cudaGetLastError();
    return TL_ERR_CUDA;
}

tl_status
tl_cublas_check(const tl_cublas_api *cublas, cublasStatus_t st, const char *what)
{
    if (st == CUBLAS_STATUS_SUCCESS) return TL_OK;
    tl_cuda_set_error("%s: %s (code %d)", what, cublas->cublasGetStatusName(st), (int)st);
    return TL_ERR_CUBLAS;
}

/* ---- cuBLAS, opened at run time ------------------------------------------------------------------
 * Where tl_cublas_load looks for libcublas.so.<major> (the major of the cublas_v2.h we were compiled
 * against), in order:
 *   1. $TLTORCH_CUBLAS_LIB when it is set: that file and nothing else (a wrong setting is reported,
 *      not silently replaced by another cuBLAS);
 *   2. the soname, as the dynamic loader resolves it: the copy torch's CUDA wheels already loaded,
 *      then LD_LIBRARY_PATH and the system's library cache;
 *   3. an nvidia-cublas wheel beside tltorch: D/../nvidia/cu<major>/lib and D/../nvidia/cublas/lib,
 *      where D is the folder of this module's .so (dladdr);
 *   4. the same two folders in every site-packages (or dist-packages) that a library already loaded
 *      in this process came from: torch's, which finds the wheel when tltorch is a develop install.
 * RTLD_LOCAL keeps cuBLAS's symbols out of the global namespace; libcublas finds libcublasLt through
 * its own RPATH. The library is never closed.
 *
 * `loaded` is the one piece of process-wide state in the CUDA core, and it is process-wide because the
 * library it points into is: the table is filled in once, under the lock, when a load succeeds, and is
 * read-only from then on (a context keeps a pointer to it, and contexts exist only after a load). A
 * failed load leaves it empty, so the next context creation searches again: a `pip install` in a
 * running notebook is picked up without a restart. */
#define TL_XSTR(x) TL_STR(x)
#define TL_STR(x) #x
#define CUBLAS_SONAME "libcublas.so." TL_XSTR(CUBLAS_VER_MAJOR)
#if CUBLAS_VER_MAJOR == 12
#define CUBLAS_PIP "nvidia-cublas-cu12"
#else
#define CUBLAS_PIP "nvidia-cublas"
#endif
/* The lib folders of the nvidia-cublas wheels, relative to a site-packages: cu13 and later, then cu12. */
static const char *const wheel_dirs[] = {"nvidia/cu" TL_XSTR(CUBLAS_VER_MAJOR) "/lib", "nvidia/cublas/lib"};
#define MAX_PACKAGE_DIRS 8

static struct {
    pthread_mutex_t lock;
    int ok;
    tl_cublas_api api;
} loaded = {PTHREAD_MUTEX_INITIALIZER, 0, {}};

/* Folders that may hold an nvidia-cublas wheel (site-packages and the like), canonical, each once. */
typedef struct {
    char dir[MAX_PACKAGE_DIRS][PATH_MAX];
    int n;
} package_dirs;

static void
add_package_dir(package_dirs *pd, const char *dir)
{
    char canon[PATH_MAX];
    if (pd->n == MAX_PACKAGE_DIRS || !realpath(dir, canon)) return;
    for (int i = 0; i < pd->n; i++)
        if (strcmp(pd->dir[i], canon) == 0) return;
    snprintf(pd->dir[pd->n++], PATH_MAX, "%s", canon);
}

/* dl_iterate_phdr callback: the site-packages (or dist-packages) a loaded library lives in. Only
 * collects: opening libraries while the loader's list is being walked could deadlock. */
static int
note_site_packages(struct dl_phdr_info *info, size_t, void *arg)
{
    static const char *const names[] = {"/site-packages/", "/dist-packages/"};
    const char *path = info->dlpi_name;
    if (!path || !path[0]) return 0;
    for (const char *name : names) {
        const char *hit = strstr(path, name);
        if (!hit) continue;
        char dir[PATH_MAX];
        const size_t len = (size_t)(hit - path) + strlen(name) - 1; /* up to the folder, no slash */
        if (len >= sizeof dir) return 0;
        memcpy(dir, path, len);
        dir[len] = '\0';
        add_package_dir((package_dirs *)arg, dir);
        return 0;
    }
    return 0;
}

/* Append to a bounded message buffer. */
static void
append(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void
append(char *buf, size_t cap, const char *fmt, ...)
{
    const size_t used = strlen(buf);
    if (used + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf + used, cap - used, fmt, ap);
    va_end(ap);
}

/* dlopen `path` and take every entry point into `api`. 1 on success; else 0, with why it failed
 * appended to `why` unless `quiet_missing` and the library simply is not there. */
static int
open_cublas(const char *path, int quiet_missing, tl_cublas_api *api, char *why, size_t cap)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *err = dlerror();
        /* "libcublas.so.13: cannot open shared object file" is "not there"; a failing dependency
         * (libcublasLt) or a broken file is worth reporting. */
        if (!(quiet_missing && err && strncmp(err, path, strlen(path)) == 0 &&
              strstr(err, "No such file")))
            append(why, cap, "; %s", err ? err : path);
        return 0;
    }
    tl_cublas_api got;
#define TL_CUBLAS_SYM(name, prototype)                                                                  \
    got.name = (decltype(got.name))dlsym(h, #name);                                                     \
    if (!got.name) {                                                                                    \
        struct link_map *lm = NULL;                                                                     \
        const int named = dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name[0];                  \
        append(why, cap, "; %s has no %s (not cuBLAS, or an older one)", named ? lm->l_name : path,     \
               #name);                                                                                  \
        dlclose(h);                                                                                     \
        return 0;                                                                                       \
    }
    TL_CUBLAS_FUNCTIONS(TL_CUBLAS_SYM)
#undef TL_CUBLAS_SYM
    *api = got;
    return 1;
}

/* Search in the order above; 1 with `api` filled in, or 0 with this thread's last error set. */
static int
search_cublas(tl_cublas_api *api)
{
    char why[1024] = "";
    const char *env = getenv("TLTORCH_CUBLAS_LIB");
    if (env && env[0]) {
        if (open_cublas(env, 0, api, why, sizeof why)) return 1;
        tl_cuda_set_error("TLTORCH_CUBLAS_LIB=%s could not be used as cuBLAS (" CUBLAS_SONAME ")%s", env,
                          why);
        return 0;
    }
    if (open_cublas(CUBLAS_SONAME, 1, api, why, sizeof why)) return 1;

    package_dirs *pd = (package_dirs *)calloc(1, sizeof *pd);
    if (!pd) {
        tl_cuda_set_error("out of memory while looking for cuBLAS (" CUBLAS_SONAME ")");
        return 0;
    }
    Dl_info self;
    if (dladdr((const void *)&tl_cublas_load, &self) && self.dli_fname) {
        char dir[PATH_MAX];
        snprintf(dir, sizeof dir, "%s", self.dli_fname);
        char *slash = strrchr(dir, '/');
        if (slash)
            snprintf(slash, sizeof dir - (size_t)(slash - dir), "/..");
        else
            snprintf(dir, sizeof dir, "..");
        add_package_dir(pd, dir);
    }
    dl_iterate_phdr(note_site_packages, pd);

    int found = 0;
    char path[PATH_MAX + 64];
    for (int i = 0; i < pd->n && !found; i++) {
        for (const char *sub : wheel_dirs) {
            snprintf(path, sizeof path, "%s/%s/" CUBLAS_SONAME, pd->dir[i], sub);
            if (access(path, F_OK) != 0) continue;
            if ((found = open_cublas(path, 0, api, why, sizeof why))) break;
        }
    }
    if (!found) {
        char where[1024] = "";
        for (int i = 0; i < pd->n; i++) append(where, sizeof where, "%s%s", i ? ", " : "", pd->dir[i]);
        tl_cuda_set_error("cuBLAS (" CUBLAS_SONAME ") was not found: install it with `pip install " CUBLAS_PIP
                          "` (torch's CUDA wheels bring it) or set TLTORCH_CUBLAS_LIB to the library's "
                          "path [looked on the library path and in nvidia/cu" TL_XSTR(CUBLAS_VER_MAJOR)
                          "/lib, nvidia/cublas/lib under: %s%s]",
                          where[0] ? where : "(no site-packages found)", why);
    }
    free(pd);
    return found;
}

const tl_cublas_api *
tl_cublas_load(void)
{
    pthread_mutex_lock(&loaded.lock);
    if (!loaded.ok) loaded.ok = search_cublas(&loaded.api);
    const int ok = loaded.ok;
    pthread_mutex_unlock(&loaded.lock);
    return ok ? &loaded.api : NULL;
}

tl_status
tl_cuda_enter(int dev, int *prev)
{
    tl_status st = tl_cuda_check(cudaGetDevice(prev), "cudaGetDevice");
    if (st) return st;
    return *prev == dev ? TL_OK : tl_cuda_check(cudaSetDevice(dev), "cudaSetDevice");
}

void
tl_cuda_leave(int dev, int prev)
{
    if (prev != dev) (void)tl_cuda_check(cudaSetDevice(prev), "cudaSetDevice (restoring)");
}

int
tl_cuda_device_count(void)
{
    int n = 0;
    /* No driver or no GPU is an answer (0), not an error; the reason stays in last_error. */
    if (tl_cuda_check(cudaGetDeviceCount(&n), "cudaGetDeviceCount")) return 0;
    return n;
}

static tl_status
check_device(int device_id)
{
    int n = 0;
    tl_status st = tl_cuda_check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
    if (st) return st;
    if (device_id < 0 || device_id >= n) {
        tl_cuda_set_error("CUDA device %d does not exist (%d visible)", device_id, n);
        return TL_ERR_DEVICE;
    }
    return TL_OK;
}

tl_status
tl_cuda_device_name(int device_id, char *buf, size_t len)
{
    if (!buf || len == 0) return TL_ERR_VALUE;
    buf[0] = '\0';
    tl_status st = check_device(device_id);
    if (st) return st;
    cudaDeviceProp prop;
    st = tl_cuda_check(cudaGetDeviceProperties(&prop, device_id), "cudaGetDeviceProperties");
    if (st) return st;
    snprintf(buf, len, "%.*s", (int)sizeof prop.name, prop.name);
    return TL_OK;
}

tl_status
tl_cuda_context_create(int device_id, tl_cuda_context **out)
{
    if (!out) return TL_ERR_VALUE;
    *out = NULL;
    tl_status st = check_device(device_id);
    if (st) return st;
    tl_cuda_context *ctx = (tl_cuda_context *)calloc(1, sizeof *ctx);
    if (!ctx) return TL_ERR_NOMEM;
    if (pthread_mutex_init(&ctx->lock, NULL) != 0) {
        free(ctx);
        return TL_ERR_NOMEM;
    }
    ctx->device_id = device_id;

    const tl_cublas_api *cublas = ctx->cublas = tl_cublas_load();
    int prev = -1;
    st = cublas ? tl_cuda_enter(device_id, &prev) : TL_ERR_CUBLAS;
    if (!st) {
        st = tl_cublas_check(cublas, cublas->cublasCreate_v2(&ctx->blas), "cublasCreate");
        /* Float32 accumulation is the contract, bfloat16/float16 outputs included: no split-K partial
         * sums rounded to the output's dtype (the pointer mode stays host: alpha, beta are floats). */
        if (!st) {
            st = tl_cublas_check(cublas, cublas->cublasSetMathMode(ctx->blas, (cublasMath_t)(
                                     CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
                                 "cublasSetMathMode");
            if (st) (void)cublas->cublasDestroy_v2(ctx->blas);
        }
        tl_cuda_leave(device_id, prev);
    }
    if (st) {
        pthread_mutex_destroy(&ctx->lock);
        free(ctx);
        return st;
    }
    *out = ctx;
    return TL_OK;
}

void
tl_cuda_context_destroy(tl_cuda_context *ctx)
{
    if (!ctx) return;
    int prev = -1;
    /* cuBLAS frees its workspace on the handle's device; if the device cannot be made current (the
     * process is tearing CUDA down) the handle is left behind rather than freed on the wrong one. */
    if (tl_cuda_enter(ctx->device_id, &prev) == TL_OK) {
        (void)ctx->cublas->cublasDestroy_v2(ctx->blas);
        tl_cuda_leave(ctx->device_id, prev);
    }
    pthread_mutex_destroy(&ctx->lock);
    free(ctx);
}
