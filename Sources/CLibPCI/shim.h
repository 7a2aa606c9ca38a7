// libpci (pciutils) headers; the project calls libpci only through CPCINames' wrappers.
#include <pci/pci.h>
