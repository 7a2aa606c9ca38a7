// VFIO ioctl request codes and non-variadic ioctl wrappers.
#define _GNU_SOURCE
#include "CVirtioShim.h"
#include <sys/mman.h>
#include <spawn.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <linux/random.h>
#include <sys/socket.h>
#include <linux/sockios.h>
#include <sys/syscall.h>
#include <unistd.h>

const unsigned long CVirtioShim_VFIO_GET_API_VERSION = VFIO_GET_API_VERSION;
const unsigned long CVirtioShim_VFIO_CHECK_EXTENSION = VFIO_CHECK_EXTENSION;
const unsigned long CVirtioShim_VFIO_SET_IOMMU = VFIO_SET_IOMMU;
const unsigned long CVirtioShim_VFIO_GROUP_GET_STATUS = VFIO_GROUP_GET_STATUS;
const unsigned long CVirtioShim_VFIO_GROUP_SET_CONTAINER = VFIO_GROUP_SET_CONTAINER;
const unsigned long CVirtioShim_VFIO_GROUP_UNSET_CONTAINER = VFIO_GROUP_UNSET_CONTAINER;
const unsigned long CVirtioShim_VFIO_GROUP_GET_DEVICE_FD = VFIO_GROUP_GET_DEVICE_FD;
const unsigned long CVirtioShim_VFIO_DEVICE_GET_INFO = VFIO_DEVICE_GET_INFO;
const unsigned long CVirtioShim_VFIO_DEVICE_GET_REGION_INFO = VFIO_DEVICE_GET_REGION_INFO;
const unsigned long CVirtioShim_VFIO_DEVICE_GET_IRQ_INFO = VFIO_DEVICE_GET_IRQ_INFO;
const unsigned long CVirtioShim_VFIO_DEVICE_SET_IRQS = VFIO_DEVICE_SET_IRQS;
const unsigned long CVirtioShim_VFIO_DEVICE_RESET = VFIO_DEVICE_RESET;
const unsigned long CVirtioShim_VFIO_IOMMU_GET_INFO = VFIO_IOMMU_GET_INFO;
const unsigned long CVirtioShim_VFIO_IOMMU_MAP_DMA = VFIO_IOMMU_MAP_DMA;
const unsigned long CVirtioShim_VFIO_IOMMU_UNMAP_DMA = VFIO_IOMMU_UNMAP_DMA;
const unsigned long CVirtioShim_RNDADDENTROPY = RNDADDENTROPY;
const unsigned long CVirtioShim_TUNSETIFF = TUNSETIFF;
const unsigned long CVirtioShim_TUNSETVNETHDRSZ = TUNSETVNETHDRSZ;
const unsigned long CVirtioShim_TUNSETOFFLOAD = TUNSETOFFLOAD;
const unsigned long CVirtioShim_TUNGETIFF = TUNGETIFF;
const unsigned long CVirtioShim_TUNGETVNETHDRSZ = TUNGETVNETHDRSZ;
const unsigned long CVirtioShim_SIOCSIFHWADDR = SIOCSIFHWADDR;
const unsigned int CVirtioShim_IFF_TAP = IFF_TAP;
const unsigned int CVirtioShim_IFF_NO_PI = IFF_NO_PI;
const unsigned int CVirtioShim_IFF_VNET_HDR = IFF_VNET_HDR;
const unsigned int CVirtioShim_TUN_F_CSUM = TUN_F_CSUM;

long CVirtioShim_ioctl_ptr(int fd, unsigned long request, void *arg) {
    int r = ioctl(fd, request, arg);
    return r < 0 ? -(long)errno : (long)r;
}

long CVirtioShim_ioctl_value(int fd, unsigned long request, unsigned long value) {
    int r = ioctl(fd, request, value);
    return r < 0 ? -(long)errno : (long)r;
}

int CVirtioShim_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }

int CVirtioShim_spawn_closefrom(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, from);
}

int CVirtioShim_peer_credentials(int fd, int *pid, unsigned int *uid, unsigned int *gid) {
    struct ucred credentials;
    socklen_t length = sizeof credentials;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) return -errno;
    *pid = credentials.pid;
    *uid = credentials.uid;
    *gid = credentials.gid;
    return 0;
}
const unsigned int CVirtioShim_MFD_CLOEXEC = MFD_CLOEXEC;

int CVirtioShim_ppoll(struct pollfd *fds, unsigned long count, long long timeout_ns) {
    struct timespec ts = { .tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL };
    int r = ppoll(fds, (nfds_t)count, timeout_ns < 0 ? NULL : &ts, NULL);
    return r < 0 ? -errno : r;
}

int CVirtioShim_io_uring_setup(unsigned int entries, struct io_uring_params *params) {
    long r = syscall(__NR_io_uring_setup, entries, params);
    return r < 0 ? -errno : (int)r;
}

int CVirtioShim_io_uring_enter(int fd, unsigned int to_submit, unsigned int min_complete, unsigned int flags,
                               const void *arg, size_t arg_size) {
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, arg_size);
    return r < 0 ? -errno : (int)r;
}
