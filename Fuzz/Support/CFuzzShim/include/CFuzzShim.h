// CFuzzShim: AddressSanitizer's manual poisoning for the fuzz targets, as no-ops in a build
// without ASan (so a target still links with -sanitize=fuzzer alone).
#ifndef CFUZZSHIM_H
#define CFUZZSHIM_H
#include <stddef.h>

/// Marks [address, address + size) unaddressable: any load or store there is an ASan report.
void CFuzzShim_poison(const void *address, size_t size);
/// Makes it addressable again (before the memory is freed or handed out).
void CFuzzShim_unpoison(const void *address, size_t size);

#endif
