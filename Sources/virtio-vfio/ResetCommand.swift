import ArgumentParser
import PCI
import Virtio
import VirtioPCI

/// `virtio-vfio reset BDF`: the seed's reset, then a fresh negotiation, N times.
struct ResetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "reset",
        abstract: "Reset a device and renegotiate its features, any number of times.",
        discussion: """
            Each cycle writes 0 to device_status and waits until it reads 0 (virtio 1.2 §4.1.4.3.2), \
            then sets ACKNOWLEDGE and DRIVER, accepts VERSION_1 and ACCESS_PLATFORM (plus --feature \
            bits the device offers), sets FEATURES_OK and checks the device kept it (§3.1.1). After \
            the last cycle the device is reset again, so it is left clean for the next driver. A \
            status reset that does not complete in --timeout-ms is followed by a function-level \
            reset (VFIO_DEVICE_RESET: FLR, PM or bus reset) where VFIO reports one, and the cycle \
            says so; --function does that reset first, on purpose.
            """)

    @OptionGroup var global: GlobalOptions
    @OptionGroup var device: DeviceArgument
    @Option(help: "How many reset + negotiate cycles.") var cycles = 1
    @Option(name: .customLong("timeout-ms"), help: "How long to wait for status to read 0 after a reset.")
    var timeoutMilliseconds = 5000
    @Option(name: .customLong("feature"), help: "Also accept this feature if offered (name or bit number; repeatable).")
    var features: [String] = []
    @Option(name: .customLong("alternate"), help: "Accept this feature (if offered) on odd cycles only (repeatable).")
    var alternate: [String] = []
    @Flag(help: "Leave the device negotiated (FEATURES_OK) after the last cycle instead of reset, so 'info' shows the set.")
    var keep = false
    @Flag(help: "First reset the whole function below virtio (VFIO_DEVICE_RESET) and check status reads 0; refused (exit 69) where VFIO reports no reset method.")
    var function = false
    @Option(help: ArgumentHelp("Reset only queue N of a running device (VIRTIO_F_RING_RESET, spec 2.6.1) instead.", valueName: "N"))
    var queue: Int?
    @Flag(help: "Print only the summary, not every cycle.") var quiet = false

    func validate() throws {
        guard cycles >= 1 else { throw ValidationError("--cycles must be at least 1") }
        guard timeoutMilliseconds >= 1 else { throw ValidationError("--timeout-ms must be at least 1") }
        guard !(function && queue != nil) else { throw ValidationError("--function resets the whole function, --queue one queue: give one of them") }
    }

    func run() throws {
        let address = try device.address()
        // A per-queue reset runs the device, which needs DMA memory for its rings and buffers.
        let transport = try global.openTransport(address, dmaBytes: queue == nil ? 0 : 2 << 20)
        if let queue {
            return try QueueResetRun(address: address, queue: queue, cycles: cycles).run(transport: transport, features: features)
        }
        let wanted = try parseFeatures(features, for: transport.deviceType).union([.version1, .accessPlatform])
        let alternating = try parseFeatures(alternate, for: transport.deviceType)
        let timeout = Duration.milliseconds(timeoutMilliseconds)
        let clock = ContinuousClock()
        var cycleTimes: [Int64] = []
        print("\(address): virtio-\(transport.deviceType), status before: \(transport.readStatus())")
        if function {
            guard transport.canResetFunction else {
                let why = VirtioError.functionReset("VFIO reports no reset method for it (no FLR, PM or bus reset; "
                    + "QEMU gives a virtio-pci device an FLR when it sits behind a PCIe port)")
                printError("virtio-vfio: error: \(VirtioPCIError.virtio(address, why))")
                throw ExitCode(Failure.unavailable)
            }
            let start = clock.now
            do throws(VirtioError) {
                try transport.resetFunction()
                let status = transport.readStatus()
                guard status.rawValue == 0 else {
                    throw VirtioError.functionReset("status reads \(status) after VFIO_DEVICE_RESET, not 0")
                }
            } catch {
                throw Failure.exit(VirtioPCIError.virtio(address, error))
            }
            print("function reset (VFIO_DEVICE_RESET): status reads 0 after \(microseconds(clock.now - start)) µs")
        }
        do {
            for cycle in 1...cycles {
                let start = clock.now
                let reset = try Lifecycle.resetDevice(transport, timeout: timeout)
                let negotiation = try Lifecycle.negotiate(transport, wanted: cycle % 2 == 1 ? wanted.union(alternating) : wanted)
                let total = microseconds(clock.now - start)
                cycleTimes.append(total)
                if !quiet {
                    let steps = negotiation.transitions.map { "\($0.wrote) -> \($0.readBack)" }
                    let how = reset.byFunctionReset ? "did not read 0 in \(timeoutMilliseconds) ms, read 0 after a function-level reset (VFIO_DEVICE_RESET)" : "read 0"
                    print("cycle \(cycle)/\(cycles): wrote 0 -> \(how) after \(reset.microseconds) µs; "
                          + steps.joined(separator: "; ")
                          + "; accepted 0x\(String(negotiation.accepted.rawValue, radix: 16)) [\(negotiation.accepted.names(for: transport.deviceType).joined(separator: " "))]; \(total) µs")
                }
            }
            // Leave the device reset: no features, no queues, ready for whoever drives it next.
            if !keep { try Lifecycle.reset(transport, timeout: timeout) }
        } catch {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        }
        let sorted = cycleTimes.sorted()
        print("\(cycles) cycle\(cycles == 1 ? "" : "s") ok; per cycle min \(sorted.first!) µs, median \(sorted[sorted.count / 2]) µs, max \(sorted.last!) µs; status after: \(transport.readStatus())")
    }

    func microseconds(_ d: Duration) -> Int64 {
        let (s, a) = d.components
        return s * 1_000_000 + a / 1_000_000_000_000
    }
}
