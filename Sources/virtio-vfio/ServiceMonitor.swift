import ArgumentParser
import HotUpgrade
import MetricsEndpoint
import PCI
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// The options every `serve` command has for being watched.
struct MonitorOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Serve Prometheus metrics over HTTP at ADDR:PORT (GET /metrics), e.g. 127.0.0.1:9464.",
                               valueName: "ADDR:PORT"))
    var metrics: String?

    func validate() throws {
        if let metrics { _ = try Self.hostAndPort(metrics) }
    }

    /// "127.0.0.1:9464", "[::1]:9464", "0.0.0.0:9464" (port 0: any free port, as tests use).
    static func hostAndPort(_ text: String) throws -> (host: String, port: Int) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw ValidationError("--metrics takes ADDR:PORT (e.g. 127.0.0.1:9464), not \(text)")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard !host.isEmpty else { throw ValidationError("--metrics takes ADDR:PORT: the address is missing in \(text)") }
        return (host, port)
    }
}

/// What one serving driver shows of itself: the samples its loop publishes (`telemetry`), the
/// metrics endpoint over them (`--metrics`), and, under a service manager, STATUS lines and the
/// watchdog. The service loop publishes; the control socket's thread calls `tick` once a second.
final class ServiceMonitor: Sendable {
    let telemetry = ServiceTelemetry()
    let exposition: MetricsExposition
    let endpoint: MetricsHTTPServer?
    /// "serving 0000:00:05.0 (driver 0.3.0)", before the loop's summary in STATUS.
    let serving: String
    let lastStatus = Mutex("")
    /// The service manager's watchdog interval (ns; WATCHDOG_USEC), nil without one.
    let watchdog: UInt64?

    init(address: PCIAddress, options: MonitorOptions) throws {
        exposition = MetricsExposition(telemetry: telemetry, device: "\(address)")
        serving = "serving \(address) (driver \(DriverVersion.string))"
        // WATCHDOG_PID is not checked: a successor inherits the old driver's environment and
        // becomes the main pid (NotifyAccess=all lets it ping before that).
        watchdog = getenv("WATCHDOG_USEC").flatMap { UInt64(String(cString: $0)) }.map { $0 * 1000 }
        if let metrics = options.metrics {
            let (host, port) = try MonitorOptions.hostAndPort(metrics)
            do { endpoint = try MetricsHTTPServer(host: host, port: port, exposition: exposition) } catch {
                printError("virtio-vfio: error: --metrics \(metrics): \(error) (is another program on that port? pick another with --metrics ADDR:PORT)")
                throw ExitCode(Failure.unavailable)
            }
        } else {
            endpoint = nil
        }
        telemetry.setFixed(TelemetrySample("driver_info", .gauge, 1, labels: [.init("version", DriverVersion.string)],
                                           help: "The driver serving the device (value 1)"))
    }

    /// Where the endpoint listens, for the start line ("" without one).
    var endpointDescription: String {
        endpoint.map { ", metrics at http://\(($0.host.contains(":") ? "[\($0.host)]" : $0.host)):\($0.port)/metrics" } ?? ""
    }

    /// A histogram of request latencies, labelled `labels`.
    func latency(_ name: String, labels: [(String, String)] = [], help: String) -> @Sendable (UInt64) -> Void {
        let histogram = exposition.latencyHistogram(name, labels: labels, help: help)
        return { histogram.recordNanoseconds(Int64(clamping: $0)) }
    }

    /// After this driver took the device over: the gap its clients saw, and how.
    func tookOver(live: Bool, gapNanoseconds: UInt64?) {
        telemetry.setFixed(TelemetrySample("upgrades", .counter, 1, labels: [.init("mode", live ? "live" : "reset")],
                                           help: "Hot upgrades that made this driver the device's (1: it took over)"))
        if let gapNanoseconds {
            telemetry.setFixed(TelemetrySample("last_upgrade_gap", .seconds, Int(clamping: gapNanoseconds),
                                               help: "The service gap of the upgrade that made this driver the device's"))
        }
    }

    /// Once a second from the control socket's thread: a new STATUS when the summary changed;
    /// WATCHDOG=1 only while the loop looks at least every half interval and finds the device
    /// answering (a hung loop or a device waiting for recovery lets the watchdog fire).
    func tick() {
        guard ServiceManager.notifySocket != nil else { return }
        var assignments: [String] = []
        let summary = telemetry.summary
        let status = summary.isEmpty ? serving : "\(serving): \(summary)"
        if lastStatus.withLock({ last in defer { last = status }; return last != status }) { assignments.append("STATUS=\(status)") }
        if let watchdog, telemetry.answered(within: watchdog / 2) { assignments.append("WATCHDOG=1") }
        if !assignments.isEmpty { tellServiceManager(assignments) }
    }

    func close() { endpoint?.close() }
}
