import Testing
import CVirtioShim
#if canImport(Glibc)
import Glibc
#endif

/// The TUN/TAP ABI (linux/if_tun.h) is fixed like VFIO's: these are the numbers the kernel decodes.
@Suite("TUN/TAP ioctl request numbers and flags (linux/if_tun.h)")
struct TunIoctlNumberTests {
    // _IOW('T', nr, int / unsigned int): write direction, 4-byte size, type 0x54.
    @Test(arguments: [
        ("TUNSETIFF", CVirtioShim_TUNSETIFF, UInt(0x4004_54CA)),
        ("TUNSETOFFLOAD", CVirtioShim_TUNSETOFFLOAD, 0x4004_54D0),
        ("TUNSETVNETHDRSZ", CVirtioShim_TUNSETVNETHDRSZ, 0x4004_54D8),
        ("SIOCSIFHWADDR", CVirtioShim_SIOCSIFHWADDR, 0x8924),
        // _IOR('T', nr, unsigned int / int): read direction.
        ("TUNGETIFF", CVirtioShim_TUNGETIFF, 0x8004_54D2),
        ("TUNGETVNETHDRSZ", CVirtioShim_TUNGETVNETHDRSZ, 0x8004_54D7),
    ])
    func requestNumber(_ name: String, _ actual: UInt, _ expected: UInt) {
        #expect(actual == expected, "\(name)")
    }

    @Test func flags() {
        #expect(CVirtioShim_IFF_TAP == 0x0002)
        #expect(CVirtioShim_IFF_NO_PI == 0x1000)
        #expect(CVirtioShim_IFF_VNET_HDR == 0x4000)
        #expect(CVirtioShim_TUN_F_CSUM == 0x01)
    }

    /// struct ifreq as TUNSETIFF reads it: the name in 16 bytes, then ifr_flags at offset 16.
    @Test func ifreqLayout() {
        #expect(MemoryLayout<ifreq>.size == 40)
        #expect(IFNAMSIZ == 16)
        #expect(MemoryLayout<ifreq>.offset(of: \ifreq.ifr_ifru) == 16)
    }
}
