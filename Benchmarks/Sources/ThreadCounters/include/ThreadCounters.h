// Per-thread counts of Swift retains/releases and of mallocs, for the ring benchmark: the
// driver runs on the benchmark's thread, the emulated device on a thread of its own, and the
// thresholds are about the driver.
//
// Retains. ordo-one/benchmark's own ARC metrics are not usable here: on Linux with Swift 6.3 it
// collects them either through swift-runtime-interposer (not available on this machine) or
// through the runtime's private _swift_retain hook pointers, which crash the process on 6.3 (the
// runtime's hook path mis-masks bridge-object pointers; ordo-one/benchmark issue #349, fixed
// for Swift 6.4). Instead, ThreadCounters.c defines the public runtime entry points swift_retain,
// swift_release, their _n variants and swift_bridgeObjectRetain/Release in the benchmark
// executable itself. The static linker binds every call the executable's Swift code makes (the
// RingBenchmark, Virtio and VirtioEmulator modules are linked into it) to these definitions; each bumps a
// counter of the calling thread and forwards to libswiftCore's definition (dlsym RTLD_NEXT).
// Not counted: reference counting done inside libswiftCore by its own code. The callgrind run
// of `virtio-vfio-ring-bench` (tools/bench-ci) counts calls to the runtime's functions
// themselves, which covers that case for the driver's hot path.
//
// Mallocs. ordo-one/benchmark counts mallocs of the whole process (LD_PRELOADed
// malloc-interposer). Its allocation hook runs on the allocating thread for every counted
// allocation; thread_counters_install_malloc_hook installs one that bumps a counter of the
// calling thread, so the driver's share can be told from the device thread's.
#ifndef THREAD_COUNTERS_H
#define THREAD_COUNTERS_H

#include <stdint.h>

/// 1 if the retain/release entry points are in place and forward to the runtime.
int thread_counters_retains_active(void);
/// Retains (swift_retain, swift_retain_n, swift_bridgeObjectRetain) made by the calling thread.
uint64_t thread_counters_retains(void);
/// Releases (swift_release, swift_release_n, swift_bridgeObjectRelease) by the calling thread.
uint64_t thread_counters_releases(void);
/// Retains made by every thread of the process (the emulated device's thread included).
uint64_t thread_counters_process_retains(void);

/// Installs the per-thread malloc counter in malloc-interposer (which counts, and so calls it,
/// only while ordo-one/benchmark measures). 1 on success, 0 if the interposer is not loaded.
int thread_counters_install_malloc_hook(void);
/// Allocations counted on the calling thread.
uint64_t thread_counters_mallocs(void);

#endif
