import HotUpgrade
import Prometheus
import Synchronization

/// The driver's metrics in Prometheus' text format, by swift-prometheus: the samples a service
/// published (`ServiceTelemetry`) as counters and gauges named `virtio_vfio_<name>` (counters
/// with `_total`), every one labelled with the device's PCI address, and latency histograms
/// recorded as requests are answered.
///
/// Counters are the service's own counts (kept in its loop, published twice a second), so at
/// each scrape they are set to the published value: a scrape shows what the loop last said.
public final class MetricsExposition: Sendable {
    let registry = PrometheusCollectorRegistry()
    let telemetry: ServiceTelemetry
    let device: String
    /// Scrapes one at a time: setting a counter is a reset and an increment.
    let scrape = Mutex(())

    public init(telemetry: ServiceTelemetry, device: String) {
        self.telemetry = telemetry
        self.device = device
    }

    /// Latency buckets: 16 µs to 4 s, doubling (the request times of a virtio device under
    /// emulation and on hardware both fall inside).
    public static let latencyBuckets: [Duration] = (0..<19).map { .nanoseconds(16_000 << $0) }

    /// A histogram of request latencies (`virtio_vfio_<name>_seconds`), labelled with the device
    /// and `labels`; record into it from any thread.
    public func latencyHistogram(_ name: String, labels: [(String, String)] = [], help: String) -> DurationHistogram {
        registry.makeDurationHistogram(descriptor: Self.descriptor(name, unit: "seconds", help: help),
                                       labels: [("device", device)] + labels, buckets: Self.latencyBuckets)
    }

    /// The exposition of everything now: the service's latest samples, then the histograms.
    public func render() -> [UInt8] {
        scrape.withLock { _ in
            for sample in telemetry.samples { set(sample) }
            return registry.emitToBuffer()
        }
    }

    func set(_ sample: TelemetrySample) {
        let labels = [("device", device)] + sample.labels.map { ($0.name, $0.value) }
        switch sample.kind {
        case .counter:
            let counter = registry.makeCounter(descriptor: Self.descriptor(sample.name, unit: "total", help: sample.help), labels: labels)
            counter.reset()
            counter.increment(by: Int64(sample.value))
        case .gauge:
            registry.makeGauge(descriptor: Self.descriptor(sample.name, unit: "", help: sample.help), labels: labels)
                .set(Int64(sample.value))
        case .seconds:
            registry.makeGauge(descriptor: Self.descriptor(sample.name, unit: "seconds", help: sample.help), labels: labels)
                .set(Double(sample.value) / 1e9)
        }
    }

    static func descriptor(_ name: String, unit: String, help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "virtio_vfio", metricName: name, unitName: unit, helpText: help)
    }
}
