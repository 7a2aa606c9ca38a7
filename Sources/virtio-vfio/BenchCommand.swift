import ArgumentParser

/// `virtio-vfio bench ...`: measurements of the driver on a real device. The ring benchmark
/// against the emulator is a separate executable, `virtio-vfio-ring-bench` (docs/PERFORMANCE.md),
/// so that this one links no emulator.
struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Measure the driver on a device bound to vfio-pci.",
        subcommands: [BenchBlk.self])
}
