// swift-tools-version:6.1
// The ring benchmarks (ordo-one/benchmark), kept out of the main package so that its
// `swift build` and `swift test` never resolve the benchmark's dependencies.
//
//   swift package --package-path Benchmarks benchmark                    # run, print the tables
//   swift package --package-path Benchmarks benchmark thresholds check   # compare with Thresholds/
//   tools/bench-ci                                                        # both checks of CI
//
// See docs/PERFORMANCE.md for what is measured and the figures.
import PackageDescription

let package = Package(
    name: "virtio-vfio-benchmarks",
    dependencies: [
        // The driver, by path: its library product RingBenchmark (the loop; through it Virtio and
        // VirtioEmulator), the same code virtio-vfio-ring-bench runs under callgrind.
        .package(name: "virtio-vfio", path: ".."),
        // Only the MallocInterposer trait: the default RuntimeInterposer trait needs
        // ordo-one/swift-runtime-interposer on Linux with Swift 6.3, which is not available
        // here; without the trait SwiftPM does not resolve it. Retains are counted by
        // ThreadCounters instead (see Sources/ThreadCounters/include/ThreadCounters.h).
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        // Per-thread retain, release and malloc counts (see its header).
        .target(name: "ThreadCounters"),
        .executableTarget(
            name: "RingBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "RingBenchmark", package: "virtio-vfio"),
                "ThreadCounters",
            ],
            path: "Benchmarks/RingBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ]
)
