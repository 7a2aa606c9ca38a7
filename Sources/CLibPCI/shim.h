// libpci (pciutils) headers; the project calls libpci only through CVirtioShim's pci wrappers.
#include <pci/pci.h>
