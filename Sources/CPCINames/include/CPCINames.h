// CPCINames: wrappers around libpci's name lookup (pci.ids / udev hwdb), the project's only use of
// libpci. libpci's API is variadic (Swift cannot call it) and exits on errors by default; these
// wrappers are neither. <pci/pci.h> is included by pcinames.c only, so no module that imports
// this one needs libpci's headers.
#ifndef CPCINAMES_H
#define CPCINAMES_H

#include <stdint.h>

/// An opaque libpci handle used only for name lookups. Never scans the bus.
typedef struct CPCINames_handle CPCINames_handle;
/// Returns NULL if libpci could not be initialised.
CPCINames_handle *CPCINames_open(void);
void CPCINames_close(CPCINames_handle *names);
/// Each lookup writes a NUL-terminated name into buf and returns 0, or returns -1 if unknown.
int CPCINames_lookup_vendor(CPCINames_handle *names, uint16_t vendor, char *buf, int size);
int CPCINames_lookup_device(CPCINames_handle *names, uint16_t vendor, uint16_t device, char *buf, int size);
int CPCINames_lookup_class(CPCINames_handle *names, uint16_t class_code, char *buf, int size);

#endif
