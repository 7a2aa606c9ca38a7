import Testing
import Foundation
import NBD
import Services
import Virtio
import VirtioDevices
import VirtioEmulator

/// `serve blk`'s backend against a device that misbehaves with requests in flight: a real NBD
/// client must see correct data and no error, the disk must hold what was written, and the
/// recovery must be counted; a device that cannot be brought back ends in EIO replies.
@Suite("the NBD export recovers a misbehaving virtio-blk by reset", .serialized)
struct BlockExportRecoveryTests {
    enum Fault: String, CaseIterable, Sendable {
        case usedIDNotInFlight, duplicateCompletion, usedLengthPastBuffer, usedIndexJump, needsReset, stopCompleting

        /// Switches the fault on until the driver's next reset (a transient fault: the reset that
        /// recovers from it ends it, inside the device, so no watcher thread races the resubmission).
        func switchOn(_ device: EmulatedDevice) {
            var faults = EmulatedDevice.Faults()
            faults.endAtReset = true
            switch self {
            case .usedIDNotInFlight: faults.usedIDNotInFlight = true
            case .duplicateCompletion: faults.duplicateCompletion = true
            case .usedLengthPastBuffer: faults.usedLengthPastBuffer = true
            case .usedIndexJump: faults.usedIndexJump = true
            case .needsReset: device.setNeedsReset()
            case .stopCompleting: faults.stopCompleting = true
            }
            device.faults = faults
        }
    }

    static func pattern(_ count: Int, seed: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: ($0 / 512) &* 7 &+ $0 &* 31 &+ seed) }
    }

    func recovers(from fault: Fault, mode: CompletionMode) throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 14))
        let old = Self.pattern(1 << 20, seed: 0)
        device.writeDisk(offset: 0, old)
        let blk = try BlockDevice(transport: EmulatedTransport(device: device), mode: mode, completionTimeout: .milliseconds(200))
        let backend = VirtioBlockBackend(device: blk)
        let a = Self.pattern(64 << 10, seed: 1), b = Self.pattern(64 << 10, seed: 2), c = Self.pattern(200 << 10, seed: 3)
        let (record, statistics, log, recoveries) = try serveExport(backend, batches: [
            // Three requests completed in order leave the descriptor free list reversed, so the
            // next requests' descriptor heads run against their submission order.
            [.read(cookie: 1, offset: 0, length: 4096), .read(cookie: 2, offset: 4096, length: 4096),
             .read(cookie: 3, offset: 8192, length: 4096)],
            // In flight when the device misbehaves: two writes to the same place (submission
            // order leaves B), a flush after them, a FUA write over three slots, a read.
            [.write(cookie: 10, offset: 0, data: a, fua: false), .write(cookie: 11, offset: 0, data: b, fua: false),
             .flush(cookie: 12), .write(cookie: 13, offset: 1 << 20, data: c, fua: true),
             .read(cookie: 14, offset: 512 << 10, length: 128 << 10)],
            [.read(cookie: 20, offset: 0, length: 64 << 10), .read(cookie: 21, offset: 1 << 20, length: 200 << 10)],
        ], before: { batch in
            guard batch == 1 else { return }
            fault.switchOn(device)
        })
        #expect(record.failure == nil, "\(record.failure ?? "")")
        for cookie: UInt64 in [1, 2, 3, 10, 11, 12, 13, 14, 20, 21] {
            // On a failure, the fault, the mode and the server's log say what happened (seen once in CI
            // under heavy load, not reproduced since: cookie 14 answered EIO).
            #expect(record.replies[cookie]?.error == 0,
                    "\(fault), \(mode): cookie \(cookie): \(record.replies[cookie].map { "error \($0.error)" } ?? "no reply"); log: \(log.suffix(30))")
        }
        #expect(record.replies[14]?.data == Array(old[(512 << 10)..<(640 << 10)]))
        #expect(record.replies[20]?.data == b)
        #expect(record.replies[21]?.data == c)
        #expect(device.readDisk(offset: 0, count: 64 << 10) == b)
        #expect(device.readDisk(offset: 1 << 20, count: 200 << 10) == c)
        #expect(device.readDisk(offset: 64 << 10, count: 64 << 10) == Array(old[(64 << 10)..<(128 << 10)]))
        #expect(recoveries >= 1, "\(log)")
        #expect(statistics.errorReplies == 0)
        #expect(device.violations.isEmpty, "\(device.violations)")
    }

    @Test(arguments: Fault.allCases)
    func recoversAndResubmitsInSubmissionOrder(_ fault: Fault) throws {
        try recovers(from: fault, mode: .poll)
    }

    @Test(arguments: [Fault.stopCompleting, .usedIDNotInFlight])
    func recoversInInterruptMode(_ fault: Fault) throws {
        try recovers(from: fault, mode: .msix)
    }

    @Test func aDeviceThatCannotBeResetEndsInEIORepliesNotAHang() throws {
        let device = EmulatedDevice(model: .blk(capacitySectors: 1 << 14))
        let blk = try BlockDevice(transport: EmulatedTransport(device: device), completionTimeout: .milliseconds(100))
        let backend = VirtioBlockBackend(device: blk, recoveryLimit: 2, resetTimeout: .milliseconds(50))
        let started = ContinuousClock.now
        let (record, _, log, recoveries) = try serveExport(backend, batches: [
            [.read(cookie: 1, offset: 0, length: 4096)],
            [.write(cookie: 10, offset: 0, data: Self.pattern(8192, seed: 4), fua: false), .read(cookie: 11, offset: 8192, length: 4096)],
            [.read(cookie: 20, offset: 0, length: 4096)],
        ], before: { batch in
            guard batch == 1 else { return }
            var faults = EmulatedDevice.Faults()
            faults.stopCompleting = true
            faults.resetNeverCompletes = true
            device.faults = faults
        })
        #expect(record.failure == nil, "\(record.failure ?? "")")
        #expect(record.replies[1]?.error == 0)
        for cookie: UInt64 in [10, 11, 20] {
            #expect(record.replies[cookie]?.error == NBDProtocol.Error.eio && record.replies[cookie]?.data == [])
        }
        #expect(recoveries == 0)
        #expect(log.contains { $0.contains("2 recoveries by reset in a row did not bring the device back") }, "\(log)")
        #expect(ContinuousClock.now - started < .seconds(10))
    }
}
