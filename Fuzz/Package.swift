// swift-tools-version:6.1
// libFuzzer targets for the code that parses what a device or a peer hands us (docs/RELIABILITY.md,
// "Fuzzing"). Kept out of the main package, like Benchmarks/, so that its `swift build` and
// `swift test` never see them. Build and run them with tools/fuzz; by hand:
//
//   swift build -c release --package-path Fuzz --scratch-path .build-fuzz --sanitize=fuzzer \
//       -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=address -Xswiftc -parse-as-library
//   SWIFT_BACKTRACE=enable=no .build-fuzz/release/FuzzCapabilities -max_total_time=60 CORPUS_DIR
// (why each flag: the comment at the top of tools/fuzz; not `--sanitize=address` as well).
//
// The library targets under Library/ are symlinks to ../Sources/<Module>: the main package has
// no library products for PCI, Virtio, NBD, Upgrade, VirtioDevices, IOUring, UBlk and Services (a path
// dependency can only use products), and building the sources here lets every module, not only
// the fuzz targets, carry libFuzzer's coverage instrumentation and ASan. Their dependencies must
// match the main Package.swift; a mismatch is a compile error here ("no such module"), not a
// silent drift.
import PackageDescription

let package = Package(
    name: "virtio-vfio-fuzz",
    dependencies: [
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        // The driver's modules under test, built from the main package's sources.
        .target(name: "CVirtioShim", path: "Library/CVirtioShim"),
        .target(name: "Syscalls", dependencies: ["CVirtioShim", .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/Syscalls"),
        .target(name: "PCI", dependencies: [.product(name: "SystemPackage", package: "swift-system")],
                path: "Library/PCI"),
        .target(name: "Virtio", dependencies: ["CVirtioShim", "Syscalls"], path: "Library/Virtio"),
        .target(name: "NBD", dependencies: ["Syscalls", "Upgrade", .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/NBD"),
        .target(name: "Upgrade", dependencies: ["Syscalls", "CVirtioShim", .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/Upgrade"),
        .target(name: "VirtioDevices", dependencies: ["Virtio", "CVirtioShim"], path: "Library/VirtioDevices"),
        .target(name: "IOUring", dependencies: ["Syscalls", "CVirtioShim", .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/IOUring"),
        .target(name: "UBlk", dependencies: ["IOUring", "Syscalls", .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/UBlk"),
        .target(name: "HotUpgrade", dependencies: ["Upgrade", "Virtio", "Syscalls", .product(name: "Logging", package: "swift-log")],
                path: "Library/HotUpgrade"),
        .target(name: "Services", dependencies: ["NBD", "UBlk", "Upgrade", "HotUpgrade", "VirtioDevices", "Virtio", "Syscalls",
                                                 .product(name: "SystemPackage", package: "swift-system")],
                path: "Library/Services"),

        // Shared by the targets: input cursor, invariant check, seed writing; ASan poisoning in C.
        .target(name: "CFuzzShim", path: "Support/CFuzzShim"),
        .target(name: "FuzzSupport", path: "Support/FuzzSupport"),

        // One libFuzzer executable per target: each defines LLVMFuzzerTestOneInput (and
        // LLVMFuzzerInitialize, which writes its seeds when asked); libFuzzer provides main.
        .executableTarget(name: "FuzzCapabilities", dependencies: ["PCI", "FuzzSupport"], path: "Targets/FuzzCapabilities"),
        .executableTarget(name: "FuzzUsedRing", dependencies: ["Virtio", "FuzzSupport", "CFuzzShim"], path: "Targets/FuzzUsedRing"),
        .executableTarget(name: "FuzzPackedRing", dependencies: ["Virtio", "FuzzSupport", "CFuzzShim"], path: "Targets/FuzzPackedRing"),
        .executableTarget(name: "FuzzNBD", dependencies: ["NBD", "FuzzSupport"], path: "Targets/FuzzNBD"),
        .executableTarget(name: "FuzzStateRecord", dependencies: ["Upgrade", "FuzzSupport"], path: "Targets/FuzzStateRecord"),
        .executableTarget(name: "FuzzNBDHandoverState", dependencies: ["NBD", "FuzzSupport"], path: "Targets/FuzzNBDHandoverState"),
        .executableTarget(name: "FuzzHandoverMessage", dependencies: ["Upgrade", "FuzzSupport"], path: "Targets/FuzzHandoverMessage"),
        .executableTarget(name: "FuzzTapHandoverState", dependencies: ["Services", "VirtioDevices", "FuzzSupport"],
                          path: "Targets/FuzzTapHandoverState"),
    ]
)
