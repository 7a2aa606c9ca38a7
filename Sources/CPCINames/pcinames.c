// libpci name lookups. Warnings (e.g. a missing pci.ids) are silenced: names are a convenience, and a
// lookup that fails returns -1. libpci's error handler must not return, so its default (print and
// exit) stays; it fires only on allocation failure.
#include "CPCINames.h"
#include <pci/pci.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct CPCINames_handle {
    struct pci_access *access;
};

static void quiet_warning(char *msg, ...) { (void)msg; }
static void quiet_debug(char *msg, ...) { (void)msg; }

CPCINames_handle *CPCINames_open(void) {
    struct pci_access *access = pci_alloc();
    if (access == NULL) return NULL;
    access->warning = quiet_warning;
    access->debug = quiet_debug;
    // Name lookups need no access method: pci.ids is loaded lazily on the first lookup.
    CPCINames_handle *names = (CPCINames_handle *)calloc(1, sizeof(*names));
    if (names == NULL) { pci_cleanup(access); return NULL; }
    names->access = access;
    return names;
}

void CPCINames_close(CPCINames_handle *names) {
    if (names == NULL) return;
    pci_cleanup(names->access);
    free(names);
}

static int copy_result(const char *result, char *buf, int size) {
    if (result == NULL || size <= 0) return -1;
    if (result != buf) {
        strncpy(buf, result, (size_t)size - 1);
        buf[size - 1] = '\0';
    }
    return 0;
}

int CPCINames_lookup_vendor(CPCINames_handle *names, uint16_t vendor, char *buf, int size) {
    if (names == NULL) return -1;
    const char *r = pci_lookup_name(names->access, buf, size, PCI_LOOKUP_VENDOR | PCI_LOOKUP_NO_NUMBERS,
                                    (int)vendor);
    return copy_result(r, buf, size);
}

int CPCINames_lookup_device(CPCINames_handle *names, uint16_t vendor, uint16_t device,
                                  char *buf, int size) {
    if (names == NULL) return -1;
    const char *r = pci_lookup_name(names->access, buf, size, PCI_LOOKUP_DEVICE | PCI_LOOKUP_NO_NUMBERS,
                                    (int)vendor, (int)device);
    return copy_result(r, buf, size);
}

int CPCINames_lookup_class(CPCINames_handle *names, uint16_t class_code, char *buf, int size) {
    if (names == NULL) return -1;
    const char *r = pci_lookup_name(names->access, buf, size, PCI_LOOKUP_CLASS | PCI_LOOKUP_NO_NUMBERS,
                                    (int)class_code);
    return copy_result(r, buf, size);
}
