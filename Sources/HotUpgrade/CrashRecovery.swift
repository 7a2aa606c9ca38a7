import Virtio

/// A driver started after its predecessor died without a handover, with the device's
/// descriptors and DMA memory kept for it (by the service manager's file descriptor store): the
/// device is adopted as it runs when its rings check out, and reset otherwise.
public enum CrashRecovery {
    /// How the device came up (`bringUp`'s `outcome`): adopted (no reset) or reset, and why not adopted.
    public enum Outcome: Sendable, Equatable {
        case adopted
        case reset(why: String)
    }

    /// `attach` maps the device from the kept descriptors (called again, on duplicates, if an
    /// adoption that had passed every check still fails: the first transport went with it).
    /// Adoption needs the device live with the features this driver would accept, queues
    /// `queues` settled (every request of the dead driver completed: `Adoption.settledSnapshots`)
    /// and `Adoption.verify` passing; then `adopt` builds the device on the rings, else `start`
    /// resets, renegotiates and rebuilds (always, when `tryAdoption` is false).
    public static func bringUp<T: Transport & ~Copyable, D: ~Copyable>(
        attach: () throws -> T, wanted: Features, vectors: [UInt16?], queues: Range<Int>, settle: Duration, tryAdoption: Bool = true,
        adopt: (consuming T, _ features: Features, _ queues: [QueueSnapshot], Adoption.Verified) throws(VirtioError) -> D,
        start: (consuming T) throws(VirtioError) -> D, outcome: inout Outcome
    ) throws -> D {
        let transport = try attach()
        guard tryAdoption else {
            outcome = .reset(why: "asked to reset")
            return try start(transport)
        }
        let running = transport.readDriverFeatures()
        let mine = Lifecycle.acceptable(offered: transport.readDeviceFeatures(), wanted: wanted)
        guard running == mine else {
            let why = "the device runs with features 0x\(String(running.rawValue, radix: 16)), this driver accepts 0x\(String(mine.rawValue, radix: 16))"
            outcome = .reset(why: why)
            return try start(transport)
        }
        let snapshots: [QueueSnapshot], verified: Adoption.Verified
        do throws(VirtioError) {
            snapshots = try Adoption.settledSnapshots(transport, queues: queues, settle: settle)
            verified = try Adoption.verify(transport, features: running, snapshots: snapshots, vectors: vectors)
        } catch {
            outcome = .reset(why: "\(error)")
            return try start(transport)
        }
        let failure: VirtioError
        do throws(VirtioError) {
            let device = try adopt(transport, running, snapshots, verified)
            outcome = .adopted
            return device
        } catch { failure = error }
        outcome = .reset(why: "adopting the rings failed: \(failure)")
        return try start(try attach())
    }
}
