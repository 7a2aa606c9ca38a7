// swift-tools-version:6.1
// A Linux VFIO userspace driver for virtio-pci devices. Layers (dependencies point down):
//   virtio-vfio (CLI) -> VirtioPCI -> Virtio, VFIO, PCI -> CVirtioShim (C); PCINames (libpci names,
//   for `list`) -> CPCINames (C) -> CLibPCI (system libpci); virtio-vfio-ring-bench -> RingBenchmark
//   -> Virtio, VirtioEmulator
// See README.md ("Architecture") for what each target owns.
import PackageDescription

let package = Package(
    name: "virtio-vfio",
    products: [
        .executable(name: "virtio-vfio", targets: ["virtio-vfio"]),
        .library(name: "VirtioPCI", targets: ["VirtioPCI"]),
        .library(name: "VirtioEmulator", targets: ["VirtioEmulator"]),
        .executable(name: "virtio-vfio-ring-bench", targets: ["virtio-vfio-ring-bench"]),
        .library(name: "RingBenchmark", targets: ["RingBenchmark"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
    ],
    targets: [
        // libpci (pciutils) through pkg-config; only CPCINames uses it.
        .systemLibrary(
            name: "CLibPCI",
            pkgConfig: "libpci",
            providers: [.apt(["libpci-dev"])]
        ),
        // Wrappers around libpci's name lookup (variadic, and it exits on errors by default).
        .target(name: "CPCINames", dependencies: ["CLibPCI"]),
        // The project's other C: ioctl request codes, volatile MMIO, barriers, CMSG.
        .target(name: "CVirtioShim"),
        // Syscalls: one wrapper per system call, ~Copyable descriptors and eventfds.
        .target(name: "Syscalls", dependencies: [
            "CVirtioShim",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // PCI: sysfs enumeration, BDF parsing, config-space parsing and the virtio capability walk.
        .target(name: "PCI", dependencies: [
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // PCINames: vendor, device and class names from libpci, for `list`.
        .target(name: "PCINames", dependencies: ["PCI", "CPCINames"]),
        // VFIO: container/group/device as ~Copyable owners, regions, BAR mmap, DMA map, IRQ info.
        .target(name: "VFIO", dependencies: ["CVirtioShim", "PCI", "Syscalls"]),
        // Virtio: transport-independent status, features, device types and the reset/negotiate lifecycle.
        .target(name: "Virtio", dependencies: ["CVirtioShim", "Syscalls"]),
        // VirtioEmulator: a spec-strict software device behind the same Transport, for tests.
        .target(name: "VirtioEmulator", dependencies: ["Virtio", "Syscalls", "CVirtioShim"]),
        // VirtioPCI: the modern virtio-pci transport (spec 4.1) over VFIO-mapped BARs.
        .target(name: "VirtioPCI", dependencies: ["Virtio", "VFIO", "PCI", "Syscalls"]),
        // NBD: the NBD protocol (fixed newstyle) and a server over any BlockBackend.
        .target(name: "NBD", dependencies: ["Syscalls", .product(name: "SystemPackage", package: "swift-system")]),
        // VirtioDevices: device drivers over any Transport (rng now; blk and net to come).
        .target(name: "VirtioDevices", dependencies: ["Virtio", "CVirtioShim"]),
        // Upgrade: the versioned state record and descriptor passing of a hot upgrade.
        .target(name: "Upgrade", dependencies: ["Syscalls", "CVirtioShim", .product(name: "SystemPackage", package: "swift-system")]),
        // Services: devices exposed to real clients (NBD export of virtio-blk, TAP bridge of virtio-net).
        .target(name: "Services", dependencies: [
            "NBD", "VirtioDevices", "Virtio", "Syscalls", "Upgrade",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        .executableTarget(name: "virtio-vfio", dependencies: [
            "VirtioPCI", "VirtioDevices", "Virtio", "VFIO", "PCI", "PCINames", "Syscalls", "Services", "NBD", "Upgrade",
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // RingBenchmark: requests through a split queue against the emulator, every completion
        // checked, the driver's work counted (docs/PERFORMANCE.md).
        .target(name: "RingBenchmark", dependencies: ["Virtio", "VirtioEmulator"]),
        // The ring benchmark as a command: what tools/bench-ci runs under callgrind.
        .executableTarget(name: "virtio-vfio-ring-bench", dependencies: [
            "RingBenchmark", "Virtio",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "PCITests", dependencies: ["PCI"]),
        .testTarget(name: "VFIOTests", dependencies: ["VFIO", "CVirtioShim", "Syscalls"]),
        // Runs inside the HIL guest only (Tests/HIL sets VIRTIO_VFIO_HIL_*); skipped elsewhere.
        .testTarget(name: "HILTests", dependencies: ["VirtioPCI", "VFIO", "Virtio", "PCI"]),
        .testTarget(name: "VirtqueueTests", dependencies: ["Virtio"]),
        .testTarget(name: "UpgradeTests", dependencies: ["Upgrade", "Syscalls", "CVirtioShim"]),
        .testTarget(name: "DeviceTests", dependencies: ["VirtioDevices", "VirtioEmulator", "Virtio", "Services", "NBD", "Upgrade", "Syscalls"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VirtioEmulator"]),
        // The emulator itself, driven by a hand-written driver-side ring writer.
        .testTarget(name: "VirtioEmulatorTests", dependencies: ["VirtioEmulator", "Virtio", "CVirtioShim"]),
        // The NBD server against an in-memory backend, a hand-written client, and nbdinfo/qemu-img/nbdcopy.
        .testTarget(name: "NBDTests", dependencies: ["NBD", "Syscalls"]),
        // The ring benchmark's loop and checks, briefly, on both emulated devices.
        .testTarget(name: "RingBenchmarkTests", dependencies: ["RingBenchmark"]),
    ]
)
