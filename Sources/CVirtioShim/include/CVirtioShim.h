// CVirtioShim: the only C in the project.
//
// It holds what Swift cannot express or import directly:
//   * ioctl request codes from <linux/vfio.h> (function-like macros do not import into Swift),
//     exported as constants and pinned by VFIOTests;
//   * non-variadic ioctl/fcntl wrappers that return -errno on failure (Swift cannot call variadic C);
//   * volatile MMIO loads and stores of 8/16/32/64 bits: the one access layer for device registers;
//   * memory barriers, each named for what the virtio spec requires of it;
//   * CMSG_* helpers for SCM_RIGHTS fd passing;
//   * the io_uring system calls (no libc wrapper) and acquire/release loads and stores of ring indices.
// libpci's name lookup has its own module, CPCINames, so that only `list` needs libpci.
#ifndef CVIRTIOSHIM_H
#define CVIRTIOSHIM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/socket.h>
#include <linux/vfio.h>
#include <sys/eventfd.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <linux/io_uring.h>

// MARK: - VFIO ioctl request codes (linux/vfio.h)
extern const unsigned long CVirtioShim_VFIO_GET_API_VERSION;
extern const unsigned long CVirtioShim_VFIO_CHECK_EXTENSION;
extern const unsigned long CVirtioShim_VFIO_SET_IOMMU;
extern const unsigned long CVirtioShim_VFIO_GROUP_GET_STATUS;
extern const unsigned long CVirtioShim_VFIO_GROUP_SET_CONTAINER;
extern const unsigned long CVirtioShim_VFIO_GROUP_UNSET_CONTAINER;
extern const unsigned long CVirtioShim_VFIO_GROUP_GET_DEVICE_FD;
extern const unsigned long CVirtioShim_VFIO_DEVICE_GET_INFO;
extern const unsigned long CVirtioShim_VFIO_DEVICE_GET_REGION_INFO;
extern const unsigned long CVirtioShim_VFIO_DEVICE_GET_IRQ_INFO;
extern const unsigned long CVirtioShim_VFIO_DEVICE_SET_IRQS;
extern const unsigned long CVirtioShim_VFIO_DEVICE_RESET;
extern const unsigned long CVirtioShim_VFIO_IOMMU_GET_INFO;
extern const unsigned long CVirtioShim_VFIO_IOMMU_MAP_DMA;
extern const unsigned long CVirtioShim_VFIO_IOMMU_UNMAP_DMA;

// MARK: - TUN/TAP ioctl request codes and flags (linux/if_tun.h)
/// TUNSETIFF: create or attach to the interface named in a struct ifreq, with ifr_flags.
extern const unsigned long CVirtioShim_TUNSETIFF;
/// TUNSETVNETHDRSZ: the size of the virtio-net header in front of each frame (int *).
extern const unsigned long CVirtioShim_TUNSETVNETHDRSZ;
/// TUNSETOFFLOAD: the TUN_F_* offloads userspace accepts in frames it reads (unsigned long value).
extern const unsigned long CVirtioShim_TUNSETOFFLOAD;
/// TUNGETIFF: the name and IFF_* flags of the interface a descriptor is attached to (struct ifreq).
extern const unsigned long CVirtioShim_TUNGETIFF;
/// TUNGETVNETHDRSZ: the virtio-net header size the descriptor uses (int *).
extern const unsigned long CVirtioShim_TUNGETVNETHDRSZ;
/// SIOCSIFHWADDR (linux/sockios.h): a TUN/TAP fd takes it directly to set the interface's MAC.
extern const unsigned long CVirtioShim_SIOCSIFHWADDR;
extern const unsigned int CVirtioShim_IFF_TAP;
extern const unsigned int CVirtioShim_IFF_NO_PI;
extern const unsigned int CVirtioShim_IFF_VNET_HDR;
extern const unsigned int CVirtioShim_TUN_F_CSUM;

/// RNDADDENTROPY from <linux/random.h>: add bytes to the kernel's entropy pool, with a credit.
extern const unsigned long CVirtioShim_RNDADDENTROPY;

// MARK: - syscalls Swift cannot call directly

/// ioctl(fd, request, arg) with a pointer argument. Returns the ioctl's result (>= 0) or -errno.
long CVirtioShim_ioctl_ptr(int fd, unsigned long request, void *arg);
/// ioctl(fd, request, value) with an integer argument. Returns the ioctl's result (>= 0) or -errno.
long CVirtioShim_ioctl_value(int fd, unsigned long request, unsigned long value);

/// memfd_create(2): anonymous memory with an fd, used for DMA memory that can be handed to the next
/// driver version. Returns the fd or -1 with errno set.
int CVirtioShim_memfd_create(const char *name, unsigned int flags);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34, _GNU_SOURCE only): the child closes
/// every descriptor from `from` up before it runs the program. `actions` is a
/// posix_spawn_file_actions_t.
int CVirtioShim_spawn_closefrom(void *actions, int from);

/// getsockopt(SO_PEERCRED) (struct ucred needs _GNU_SOURCE, which Swift's Glibc module lacks).
/// Returns 0 or -errno.
int CVirtioShim_peer_credentials(int fd, int *pid, unsigned int *uid, unsigned int *gid);
extern const unsigned int CVirtioShim_MFD_CLOEXEC;

/// ppoll(2) with a nanosecond timeout (negative: wait forever) and no signal mask (ppoll needs
/// _GNU_SOURCE, which Swift's Glibc module lacks). Returns the ready count or -errno.
int CVirtioShim_ppoll(struct pollfd *fds, unsigned long count, long long timeout_ns);

// MARK: - volatile MMIO (one layer; every device register access goes through these)
// Virtio 1.2 §4.1.3.1: the driver MUST use 8-bit accesses for 8-bit fields, 16-bit aligned accesses
// for 16-bit fields and 32-bit aligned accesses for 32- and 64-bit fields. The 64-bit variants exist
// for devices that allow them; the virtio-pci transport splits 64-bit fields into two 32-bit accesses.
static inline uint8_t CVirtioShim_mmio_read8(const volatile void *addr) {
    return *(const volatile uint8_t *)addr;
}
static inline uint16_t CVirtioShim_mmio_read16(const volatile void *addr) {
    return *(const volatile uint16_t *)addr;
}
static inline uint32_t CVirtioShim_mmio_read32(const volatile void *addr) {
    return *(const volatile uint32_t *)addr;
}
static inline uint64_t CVirtioShim_mmio_read64(const volatile void *addr) {
    return *(const volatile uint64_t *)addr;
}
static inline void CVirtioShim_mmio_write8(volatile void *addr, uint8_t value) {
    *(volatile uint8_t *)addr = value;
}
static inline void CVirtioShim_mmio_write16(volatile void *addr, uint16_t value) {
    *(volatile uint16_t *)addr = value;
}
static inline void CVirtioShim_mmio_write32(volatile void *addr, uint32_t value) {
    *(volatile uint32_t *)addr = value;
}
static inline void CVirtioShim_mmio_write64(volatile void *addr, uint64_t value) {
    *(volatile uint64_t *)addr = value;
}

// MARK: - barriers (the Swift side names each use with its spec section)
// These match Linux's virt_mb/virt_rmb/virt_wmb, which virtio uses for memory shared with a device
// that is cache-coherent with the CPU (any PCI device behind VFIO on x86-64 and arm64 servers).
/// Full barrier: orders earlier loads and stores before later loads and stores.
static inline void CVirtioShim_barrier_full(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/// Read barrier: earlier loads complete before later loads (e.g. used idx before used ring entries).
static inline void CVirtioShim_barrier_read(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/// Write barrier: earlier stores are visible before later stores (e.g. ring entries before idx).
static inline void CVirtioShim_barrier_write(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }

// The same three for a device described by the platform, when VIRTIO_F_ORDER_PLATFORM is
// negotiated (virtio 1.2 §6: "the driver needs to use memory barriers suitable for devices
// described by the platform"): Linux's mb/dma_rmb/dma_wmb, which virtio_ring uses without
// weak_barriers. On x86-64 only the full barrier differs (mfence instead of a locked add); on
// arm64 all three are outer-shareable (dsb sy, dmb oshld, dmb oshst) instead of inner-shareable.
static inline void CVirtioShim_platform_barrier_full(void) {
#if defined(__x86_64__)
    __asm__ __volatile__("mfence" ::: "memory");
#elif defined(__aarch64__)
    __asm__ __volatile__("dsb sy" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}
static inline void CVirtioShim_platform_barrier_read(void) {
#if defined(__x86_64__)
    __asm__ __volatile__("" ::: "memory");  /* loads are not reordered with loads (dma_rmb) */
#elif defined(__aarch64__)
    __asm__ __volatile__("dmb oshld" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
}
static inline void CVirtioShim_platform_barrier_write(void) {
#if defined(__x86_64__)
    __asm__ __volatile__("" ::: "memory");  /* stores are not reordered with stores (dma_wmb) */
#elif defined(__aarch64__)
    __asm__ __volatile__("dmb oshst" ::: "memory");
#else
    __atomic_thread_fence(__ATOMIC_RELEASE);
#endif
}

// MARK: - CMSG helpers (SCM_RIGHTS)
size_t CVirtioShim_CMSG_SPACE(size_t payload);
size_t CVirtioShim_CMSG_LEN(size_t payload);
struct cmsghdr *CVirtioShim_CMSG_FIRSTHDR(struct msghdr *msg);
struct cmsghdr *CVirtioShim_CMSG_NXTHDR(struct msghdr *msg, struct cmsghdr *cmsg);
unsigned char *CVirtioShim_CMSG_DATA(struct cmsghdr *cmsg);

// MARK: - io_uring (linux/io_uring.h gives the structs; the system calls have no libc wrapper)
/// io_uring_setup(2). Returns the ring's descriptor (close-on-exec) or -errno.
int CVirtioShim_io_uring_setup(unsigned int entries, struct io_uring_params *params);
/// io_uring_enter(2) with an optional io_uring_getevents_arg (IORING_ENTER_EXT_ARG). Returns the
/// number of submissions consumed or -errno.
int CVirtioShim_io_uring_enter(int fd, unsigned int to_submit, unsigned int min_complete, unsigned int flags,
                               const void *arg, size_t arg_size);
/// Acquire load and release store of a 32-bit ring index shared with the kernel (io_uring's SQ and
/// CQ head/tail: the ordering io_uring/io_uring.c documents at its top).
static inline uint32_t CVirtioShim_load_acquire32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE); }
static inline void CVirtioShim_store_release32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE); }

#endif
