import SystemPackage
import Testing
@testable import UBlk

/// Every ublk failure names the command or file and, where there is one, the fix.
@Suite("ublk errors")
struct UBlkErrorTests {
    @Test func aKernelWithoutUblkIsOneLineNamingTheModuleAndNBD() {
        let text = "\(UBlkError.unavailable(Errno(rawValue: 2)))"
        #expect(text.hasPrefix("ublk is not available: no /dev/ublk-control ("))
        #expect(text.contains("ublk_drv") && text.contains("modprobe ublk_drv") && text.contains("--nbd"))
        #expect(!text.contains("\n"))
        #expect("\(UBlkError.unavailable(Errno(rawValue: 13)))".contains("CAP_SYS_ADMIN"))
    }

    @Test func commandsTheKernelRefusesAreNamedWithTheirErrno() {
        #expect("\(UBlkError.command(.addDevice, deviceID: 3, Errno(rawValue: 17)))"
                == "ublk ADD_DEV for device 3 failed: File exists (errno 17): ublk id 3 is in use; pick another --ublk-id or leave it out")
        #expect("\(UBlkError.command(.startUserRecovery, deviceID: 0, Errno(rawValue: 16)))".contains("START_USER_RECOVERY for device 0 failed"))
        #expect("\(UBlkError.command(.startUserRecovery, deviceID: 0, Errno(rawValue: 16)))".contains("previous server still holds it"))
        #expect("\(UBlkError.command(.setParameters, deviceID: .max, Errno(rawValue: 22)))"
                == "ublk SET_PARAMS for a new device failed: Invalid argument (errno 22)")
        #expect("\(UBlkError.command(.getDeviceInfo, deviceID: 9, Errno(rawValue: 19)))".hasSuffix("there is no ublk device 9"))
        #expect("\(UBlkError.command(.getFeatures, deviceID: .max, Errno(rawValue: 95)))".contains("Linux 6.3 or later"))
    }
}
