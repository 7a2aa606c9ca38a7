// swift-tools-version:6.1
// A Linux VFIO userspace driver for virtio-pci devices. Its targets in layers, top to bottom;
// a target depends only on targets in layers below its own (the list of targets says on which),
// so the CLI imports the libraries and nothing imports the CLI:
//
//   virtio-vfio (the CLI, shipped)                       virtio-vfio-ring-bench (callgrind's command)
//   MetricsEndpoint (--metrics: Prometheus over HTTP)
//   Services (NBD export of blk, TAP bridge of net,      RingBenchmark (the ring loop on the emulator)
//             entropy feed of rng: UpgradableServices)
//   VirtioDevices   VirtioPCI   VirtioEmulator   NBD
//   HotUpgrade (control socket, hand-over, take-over, rollback for any service)
//   Virtio   VFIO   Upgrade (state record, messages, descriptor passing)   PCINames (libpci names)
//   UBlk (ublk control and queues)   IOUring
//   PCI   Syscalls   CPCINames (C: libpci wrappers)
//   CVirtioShim (C: ioctl codes, MMIO, barriers, CMSG)   CLibPCI (system libpci)
//   CRingReference (C: the rings again, a yardstick for RingBenchmark only)
//
// The shipped virtio-vfio links no emulator; only PCINames needs libpci. The tests, Benchmarks/
// (a package of its own, over RingBenchmark) and Fuzz/ (which builds some of these targets from
// their sources: keep its dependencies the same) stand beside the layers. README.md
// ("Architecture") says what each target owns.
import PackageDescription

let systemPackage: Target.Dependency = .product(name: "SystemPackage", package: "swift-system")

let package = Package(
    name: "virtio-vfio",
    products: [
        .executable(name: "virtio-vfio", targets: ["virtio-vfio"]),
        .executable(name: "virtio-vfio-ring-bench", targets: ["virtio-vfio-ring-bench"]),
        .library(name: "VirtioPCI", targets: ["VirtioPCI"]),
        .library(name: "VirtioEmulator", targets: ["VirtioEmulator"]),
        .library(name: "RingBenchmark", targets: ["RingBenchmark"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.1.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.1.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
    ],
    targets: [
        // MARK: C
        // The project's C, besides CPCINames: ioctl request codes, non-variadic ioctl/fcntl, volatile
        // MMIO, barriers, CMSG helpers, memfd_create, ppoll.
        .target(name: "CVirtioShim"),
        // libpci (pciutils) through pkg-config; only CPCINames uses it.
        .systemLibrary(
            name: "CLibPCI",
            pkgConfig: "libpci",
            providers: [.apt(["libpci-dev"])]
        ),
        // Wrappers around libpci's name lookup (variadic, and it exits on errors by default).
        .target(name: "CPCINames", dependencies: ["CLibPCI"]),
        // A C reference implementation of the split and packed rings (the same algorithms and
        // checks as Virtio's SplitQueue and PackedQueue) and of the ring benchmark's hot path:
        // the yardstick of docs/PERFORMANCE.md's "Swift against a C reference". Only
        // RingBenchmark links it (so virtio-vfio-ring-bench does); the shipped virtio-vfio does not.
        .target(name: "CRingReference", dependencies: ["CVirtioShim"]),

        // MARK: Platform
        // Syscalls: one wrapper per system call, ~Copyable descriptors and eventfds.
        .target(name: "Syscalls", dependencies: ["CVirtioShim", systemPackage]),
        // PCI: sysfs enumeration, BDF parsing, config-space parsing and the virtio capability walk.
        .target(name: "PCI", dependencies: [systemPackage]),
        // PCINames: vendor, device and class names from libpci, for `list`.
        .target(name: "PCINames", dependencies: ["PCI", "CPCINames"]),
        // IOUring: an io_uring instance (rings mapped, entries written, completions drained) over
        // Syscalls' io_uring system calls.
        .target(name: "IOUring", dependencies: ["Syscalls", "CVirtioShim", systemPackage]),
        // UBlk: Linux's ublk interface (UAPI values pinned in UBlkTests): the control device's
        // commands and a queue's FETCH/COMMIT loop over IOUring.
        .target(name: "UBlk", dependencies: ["IOUring", "Syscalls", systemPackage]),
        // VFIO: container/group/device as ~Copyable owners, regions, BAR mmap, DMA map, IRQ info.
        .target(name: "VFIO", dependencies: ["PCI", "Syscalls", "CVirtioShim"]),

        // MARK: Virtio
        // Virtio: transport-independent status, features, device types, the reset/negotiate
        // lifecycle, the split virtqueue and the Transport protocol.
        .target(name: "Virtio", dependencies: ["Syscalls", "CVirtioShim"]),

        // MARK: Transports, devices, protocols
        // VirtioPCI: the modern virtio-pci transport (spec 4.1) over VFIO-mapped BARs.
        .target(name: "VirtioPCI", dependencies: ["Virtio", "VFIO", "PCI", "Syscalls", "HotUpgrade", "Upgrade"]),
        // VirtioEmulator: a spec-strict software device behind the same Transport, for tests and
        // the ring benchmark.
        .target(name: "VirtioEmulator", dependencies: ["Virtio", "Syscalls", "CVirtioShim"]),
        // VirtioDevices: the rng, blk and net drivers over any Transport.
        .target(name: "VirtioDevices", dependencies: ["Virtio", "CVirtioShim"]),
        // NBD: the NBD protocol (fixed newstyle) and a server over any BlockBackend; its hand-over
        // state is written with Upgrade's codec.
        .target(name: "NBD", dependencies: ["Syscalls", "Upgrade", systemPackage]),
        // Upgrade: the versioned state record, the one codec for every handover blob, and descriptor
        // passing of a hot upgrade.
        .target(name: "Upgrade", dependencies: ["Syscalls", "CVirtioShim", systemPackage]),
        // HotUpgrade: the hot-upgrade protocol for any service: the serving driver's control socket,
        // hand-over and rollback, the successor's take-over, the live-or-reset choice. Nothing
        // device-specific: a transport conforms to HandoverTransport (VirtioPCI does).
        .target(name: "HotUpgrade", dependencies: [
            "Upgrade", "Virtio", "Syscalls", .product(name: "Logging", package: "swift-log"),
        ]),

        // MARK: Services
        // Services: devices exposed to real clients (NBD export of virtio-blk, TAP bridge of virtio-net,
        // entropy feed of virtio-rng), each an UpgradableService.
        .target(name: "Services", dependencies: ["NBD", "UBlk", "Upgrade", "HotUpgrade", "VirtioDevices", "Virtio", "Syscalls", systemPackage]),
        // RingBenchmark: requests through a split queue against the emulator, every completion
        // checked, the driver's work counted (docs/PERFORMANCE.md).
        .target(name: "RingBenchmark", dependencies: ["Virtio", "VirtioEmulator", "CRingReference"]),
        // MetricsEndpoint: `--metrics`: a service's published samples and latency histograms in
        // Prometheus' text format (swift-prometheus), served over HTTP (SwiftNIO).
        .target(name: "MetricsEndpoint", dependencies: [
            "HotUpgrade", "Syscalls",
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),

        // MARK: Executables
        // The driver's command line, the one shipped binary.
        .executableTarget(name: "virtio-vfio", dependencies: [
            "Services", "HotUpgrade", "VirtioDevices", "VirtioPCI", "NBD", "UBlk", "Upgrade", "Virtio", "VFIO", "PCI", "PCINames",
            "MetricsEndpoint", "Syscalls", "CVirtioShim", systemPackage,
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Histogram", package: "hdrhistogram-swift"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The ring benchmark as a command: what tools/bench-ci runs under callgrind.
        .executableTarget(name: "virtio-vfio-ring-bench", dependencies: [
            "RingBenchmark", "Virtio",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        // MARK: Tests
        .testTarget(name: "PCITests", dependencies: ["PCI"]),
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
        .testTarget(name: "UBlkTests", dependencies: ["UBlk", "IOUring", "Services", "NBD", "VirtioDevices", "Syscalls", "CVirtioShim"]),
        // The ring benchmark's loop and checks, briefly, on both emulated devices.
        .testTarget(name: "RingBenchmarkTests", dependencies: ["RingBenchmark", "VirtioEmulator"]),
        // The exposition of every service's samples and the HTTP endpoint, over a real socket.
        .testTarget(name: "MetricsEndpointTests", dependencies: ["MetricsEndpoint", "HotUpgrade", "Services", "NBD", "VirtioDevices", "Syscalls"]),
    ]
)
