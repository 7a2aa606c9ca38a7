// See include/ThreadCounters.h for what this counts, how, and why.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stddef.h>
#include "ThreadCounters.h"

typedef void *(*retain_fn)(void *);
typedef void (*release_fn)(void *);
typedef void *(*retain_n_fn)(void *, uint32_t);
typedef void (*release_n_fn)(void *, uint32_t);

// local-exec TLS in the executable: reading or bumping it never allocates or calls anything.
static __thread uint64_t thread_retains __attribute__((tls_model("local-exec")));
static __thread uint64_t thread_releases __attribute__((tls_model("local-exec")));
static __thread uint64_t thread_mallocs __attribute__((tls_model("local-exec")));
static _Atomic uint64_t process_retains;

// The runtime's definitions, resolved on first use: libraries' initialisers retain objects
// before any constructor of ours would run. Racing resolutions store the same values.
static _Atomic(retain_fn) real_retain;
static _Atomic(release_fn) real_release;
static _Atomic(retain_n_fn) real_retain_n;
static _Atomic(release_n_fn) real_release_n;
static _Atomic(retain_fn) real_bridge_retain;
static _Atomic(release_fn) real_bridge_release;
static _Atomic int resolved;

static void resolve(void) {
    atomic_store(&real_retain, (retain_fn)dlsym(RTLD_NEXT, "swift_retain"));
    atomic_store(&real_release, (release_fn)dlsym(RTLD_NEXT, "swift_release"));
    atomic_store(&real_retain_n, (retain_n_fn)dlsym(RTLD_NEXT, "swift_retain_n"));
    atomic_store(&real_release_n, (release_n_fn)dlsym(RTLD_NEXT, "swift_release_n"));
    atomic_store(&real_bridge_retain, (retain_fn)dlsym(RTLD_NEXT, "swift_bridgeObjectRetain"));
    atomic_store(&real_bridge_release, (release_fn)dlsym(RTLD_NEXT, "swift_bridgeObjectRelease"));
    atomic_store_explicit(&resolved, 1, memory_order_release);
}

#define RESOLVED() \
    do { if (__builtin_expect(!atomic_load_explicit(&resolved, memory_order_acquire), 0)) resolve(); } while (0)
#define REAL(name) atomic_load_explicit(&name, memory_order_relaxed)

int thread_counters_retains_active(void) {
    RESOLVED();
    return REAL(real_retain) != NULL && REAL(real_release) != NULL && REAL(real_retain_n) != NULL
        && REAL(real_release_n) != NULL && REAL(real_bridge_retain) != NULL && REAL(real_bridge_release) != NULL;
}

void *swift_retain(void *object) {
    RESOLVED();
    thread_retains++;
    atomic_fetch_add_explicit(&process_retains, 1, memory_order_relaxed);
    return REAL(real_retain)(object);
}

void *swift_retain_n(void *object, uint32_t n) {
    RESOLVED();
    thread_retains += n;
    atomic_fetch_add_explicit(&process_retains, n, memory_order_relaxed);
    return REAL(real_retain_n)(object, n);
}

void *swift_bridgeObjectRetain(void *object) {
    RESOLVED();
    thread_retains++;
    atomic_fetch_add_explicit(&process_retains, 1, memory_order_relaxed);
    return REAL(real_bridge_retain)(object);
}

void swift_release(void *object) {
    RESOLVED();
    thread_releases++;
    REAL(real_release)(object);
}

void swift_release_n(void *object, uint32_t n) {
    RESOLVED();
    thread_releases += n;
    REAL(real_release_n)(object, n);
}

void swift_bridgeObjectRelease(void *object) {
    RESOLVED();
    thread_releases++;
    REAL(real_bridge_release)(object);
}

uint64_t thread_counters_retains(void) { return thread_retains; }
uint64_t thread_counters_releases(void) { return thread_releases; }
uint64_t thread_counters_process_retains(void) {
    return atomic_load_explicit(&process_retains, memory_order_relaxed);
}

// Runs inside the allocator: touches only this thread's counter (no allocation, no locks).
static void count_allocation(size_t size) {
    (void)size;
    thread_mallocs++;
}

int thread_counters_install_malloc_hook(void) {
    typedef void (*hook_t)(size_t);
    void (*set_hook)(hook_t) = (void (*)(hook_t))dlsym(RTLD_DEFAULT, "malloc_interposer_set_allocation_hook");
    if (set_hook == NULL) return 0;
    set_hook(count_allocation);
    return 1;
}

uint64_t thread_counters_mallocs(void) { return thread_mallocs; }
