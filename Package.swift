// swift-tools-version:6.1
// A Linux VFIO userspace driver for virtio-pci devices. Layers (dependencies point down):
//   virtio-vfio (CLI) -> VirtioPCI -> Virtio, VFIO, PCI -> CVirtioShim (C) -> CLibPCI (system libpci)
// See README.md ("Architecture") for what each target owns.
import PackageDescription

let package = Package(
    name: "virtio-vfio",
    products: [
        .executable(name: "virtio-vfio", targets: ["virtio-vfio"]),
        .library(name: "VirtioPCI", targets: ["VirtioPCI"]),
        .library(name: "VirtioEmulator", targets: ["VirtioEmulator"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
    ],
    targets: [
        // libpci (pciutils) through pkg-config; only used for human-readable names.
        .systemLibrary(
            name: "CLibPCI",
            pkgConfig: "libpci",
            providers: [.apt(["libpci-dev"])]
        ),
        // The only C in the project: ioctl request codes, volatile MMIO, barriers, CMSG, libpci wrappers.
        .target(name: "CVirtioShim", dependencies: ["CLibPCI"]),
        // Syscalls: one wrapper per system call, ~Copyable descriptors and eventfds.
        .target(name: "Syscalls", dependencies: [
            "CVirtioShim",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // PCI: sysfs enumeration, BDF parsing, config-space parsing and the virtio capability walk.
        .target(name: "PCI", dependencies: [
            "CVirtioShim",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // VFIO: container/group/device as ~Copyable owners, regions, BAR mmap, DMA map, IRQ info.
        .target(name: "VFIO", dependencies: [
            "CVirtioShim", "PCI", "Syscalls",
            .product(name: "SystemPackage", package: "swift-system"),
        ]),
        // Virtio: transport-independent status, features, device types and the reset/negotiate lifecycle.
        .target(name: "Virtio", dependencies: ["CVirtioShim", "Syscalls"]),
        // VirtioEmulator: a spec-strict software device behind the same Transport, for tests.
        .target(name: "VirtioEmulator", dependencies: ["Virtio", "Syscalls", "CVirtioShim"]),
        // VirtioPCI: the modern virtio-pci transport (spec 4.1) over VFIO-mapped BARs.
        .target(name: "VirtioPCI", dependencies: [
            "Virtio", "VFIO", "PCI", "CVirtioShim", "Syscalls", "HotUpgrade", "Upgrade",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // NBD: the NBD protocol (fixed newstyle) and a server over any BlockBackend; its hand-over
        // state is written with Upgrade's codec.
        .target(name: "NBD", dependencies: ["Syscalls", "Upgrade", .product(name: "SystemPackage", package: "swift-system")]),
        // VirtioDevices: device drivers over any Transport (rng now; blk and net to come).
        .target(name: "VirtioDevices", dependencies: ["Virtio"]),
        // Upgrade: the versioned state record, the one codec for every handover blob, and descriptor
        // passing of a hot upgrade.
        .target(name: "Upgrade", dependencies: ["Syscalls", "CVirtioShim", .product(name: "SystemPackage", package: "swift-system")]),
        // HotUpgrade: the hot-upgrade protocol for any service: the serving driver's control socket,
        // hand-over and rollback, the successor's take-over, the live-or-reset choice.
        .target(name: "HotUpgrade", dependencies: [
            "Upgrade", "Virtio", "Syscalls", .product(name: "Logging", package: "swift-log"),
        ]),
        // Services: devices exposed to real clients (NBD export of virtio-blk, TAP bridge of virtio-net,
        // entropy feed of virtio-rng), each an UpgradableService.
        .target(name: "Services", dependencies: ["NBD", "VirtioDevices", "Virtio", "Syscalls", "Upgrade", "HotUpgrade"]),
        .executableTarget(name: "virtio-vfio", dependencies: [
            "VirtioPCI", "VirtioDevices", "Virtio", "VirtioEmulator", "VFIO", "PCI", "Syscalls", "Services", "NBD", "Upgrade", "HotUpgrade",
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "PCITests", dependencies: ["PCI", "VirtioPCI"]),
        .testTarget(name: "VFIOTests", dependencies: ["VFIO", "CVirtioShim", "Syscalls"]),
        // Runs inside the HIL guest only (Tests/HIL sets VIRTIO_VFIO_HIL_*); skipped elsewhere.
        .testTarget(name: "HILTests", dependencies: ["VirtioPCI", "VFIO", "Virtio", "PCI"]),
        .testTarget(name: "VirtqueueTests", dependencies: ["Virtio"]),
        .testTarget(name: "UpgradeTests", dependencies: ["Upgrade", "Syscalls", "CVirtioShim"]),
        // The whole handover state machine, both sides in one process, against the emulator.
        .testTarget(name: "HotUpgradeTests", dependencies: [
            "HotUpgrade", "Services", "Upgrade", "Virtio", "VirtioDevices", "VirtioEmulator", "NBD", "Syscalls",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "DeviceTests", dependencies: ["VirtioDevices", "VirtioEmulator", "Virtio", "Services", "NBD", "Upgrade", "Syscalls"]),
        .testTarget(name: "VirtioTests", dependencies: ["Virtio", "VirtioEmulator"]),
        // The emulator itself, driven by a hand-written driver-side ring writer.
        .testTarget(name: "VirtioEmulatorTests", dependencies: ["VirtioEmulator", "Virtio", "CVirtioShim"]),
        // The NBD server against an in-memory backend, a hand-written client, and nbdinfo/qemu-img/nbdcopy.
        .testTarget(name: "NBDTests", dependencies: ["NBD", "Syscalls"]),
    ]
)
