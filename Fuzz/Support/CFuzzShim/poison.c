#include "CFuzzShim.h"

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CFUZZSHIM_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define CFUZZSHIM_ASAN 1
#endif

#ifdef CFUZZSHIM_ASAN
#include <sanitizer/asan_interface.h>
void CFuzzShim_poison(const void *address, size_t size) { __asan_poison_memory_region(address, size); }
void CFuzzShim_unpoison(const void *address, size_t size) { __asan_unpoison_memory_region(address, size); }
#else
void CFuzzShim_poison(const void *address, size_t size) { (void)address; (void)size; }
void CFuzzShim_unpoison(const void *address, size_t size) { (void)address; (void)size; }
#endif
