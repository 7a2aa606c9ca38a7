import ArgumentParser
import PCI
import Virtio
import VirtioDevices
import VirtioPCI

/// `virtio-vfio reset BDF --queue N`: per-queue reset on a running device (spec 2.6.1).
/// The device is brought up with its queue full of buffers, read from, then queue N is reset
/// (the device stops using its buffers; every one is reclaimed), re-enabled, and read from again.
/// Today the running driver for this is virtio-rng; blk and net queues come with their drivers.
struct QueueResetRun {
    let address: PCIAddress
    let queue: Int
    let cycles: Int

    func run(transport: consuming VirtioPCITransport, features: [String]) throws {
        guard transport.deviceType == .entropy else {
            throw Failure.exit(ValidationError("--queue needs a running driver for the device; only virtio-rng has one so far (this is virtio-\(transport.deviceType))"))
        }
        guard queue == 0 else {
            throw Failure.exit(ValidationError("virtio-rng has one queue (0); there is no queue \(queue)"))
        }
        let wanted = try parseFeatures(features, for: .entropy).union(.ringReset)
        let offered = transport.readDeviceFeatures()
        guard offered.contains(.ringReset) else {
            throw Failure.exit(VirtioPCIError.virtio(address, .missingFeature("RING_RESET")))
        }
        do throws(VirtioError) {
            var rng = try EntropyDevice(transport: transport, wanted: wanted, mode: .poll)
            var sink = 0
            try rng.read(4096) { sink += $0.count }
            for cycle in 1...cycles {
                let clock = ContinuousClock()
                let start = clock.now
                let reclaimed = try rng.resetQueue()
                let elapsed = clock.now - start
                var after = 0
                try rng.read(4096) { after += $0.count }
                print("queue reset \(cycle)/\(cycles): queue \(queue) reset, \(reclaimed) buffers reclaimed, re-enabled; read \(after) bytes after; \(elapsed.components.attoseconds / 1_000_000_000_000 + elapsed.components.seconds * 1_000_000) µs")
            }
            _ = try rng.shutdown()
        } catch {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        }
    }
}
