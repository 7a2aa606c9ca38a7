// CMSG_* are macros; these functions make them callable from Swift.
#include "CVirtioShim.h"

size_t CVirtioShim_CMSG_SPACE(size_t payload) { return CMSG_SPACE(payload); }
size_t CVirtioShim_CMSG_LEN(size_t payload) { return CMSG_LEN(payload); }
struct cmsghdr *CVirtioShim_CMSG_FIRSTHDR(struct msghdr *msg) { return CMSG_FIRSTHDR(msg); }
struct cmsghdr *CVirtioShim_CMSG_NXTHDR(struct msghdr *msg, struct cmsghdr *cmsg) {
    return CMSG_NXTHDR(msg, cmsg);
}
unsigned char *CVirtioShim_CMSG_DATA(struct cmsghdr *cmsg) { return CMSG_DATA(cmsg); }
