import HotUpgrade
import NBD
import Services
import Syscalls
import Testing
import VirtioDevices
@testable import MetricsEndpoint
#if canImport(Glibc)
import Glibc
#endif

/// The exposition of what services publish, and the endpoint over a real TCP socket.
@Suite("Metrics endpoint")
struct MetricsEndpointTests {
    /// Exposition lines by series ("name{labels}" -> value), comments left out.
    static func series(_ text: String) -> [String: String] {
        var out: [String: String] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " ") else { continue }
            out[String(line[..<space])] = String(line[line.index(after: space)...])
        }
        return out
    }

    static func blockStatus(reads: Int, writes: Int, bytesRead: UInt64, clients: Int, answering: Bool = true) -> NBDServerStatus {
        var st = NBDServerStatistics()
        st.reads = reads
        st.writes = writes
        st.bytesRead = bytesRead
        return NBDServerStatus(statistics: st, connectedClients: clients, inFlight: 3,
                               backend: BackendHealth(recoveries: 2, answering: answering))
    }

    @Test("blk samples become labelled counters and gauges; a later publish moves them")
    func blockSeries() {
        let telemetry = ServiceTelemetry()
        let exposition = MetricsExposition(telemetry: telemetry, device: "0000:00:05.0")
        var report = ServiceReports.block(Self.blockStatus(reads: 7, writes: 3, bytesRead: 7 * 4096, clients: 1))
        telemetry.publish(report.samples, summary: report.summary, deviceAnswers: true)
        var s = Self.series(String(decoding: exposition.render(), as: UTF8.self))
        let d = "device=\"0000:00:05.0\""
        #expect(s["virtio_vfio_blk_requests_total{\(d),queue=\"0\",op=\"read\"}"] == "7")
        #expect(s["virtio_vfio_blk_requests_total{\(d),queue=\"0\",op=\"write\"}"] == "3")
        #expect(s["virtio_vfio_blk_bytes_total{\(d),queue=\"0\",direction=\"read\"}"] == "28672")
        #expect(s["virtio_vfio_nbd_clients{\(d)}"] == "1.0")
        #expect(s["virtio_vfio_blk_requests_in_flight{\(d),queue=\"0\"}"] == "3.0")
        #expect(s["virtio_vfio_device_recoveries_total{\(d)}"] == "2")
        #expect(s["virtio_vfio_device_answering{\(d)}"] == "1.0")
        #expect(report.summary == "1 NBD client, 7 reads, 3 writes, 0 errors, 2 recoveries")

        report = ServiceReports.block(Self.blockStatus(reads: 9, writes: 3, bytesRead: 9 * 4096, clients: 2, answering: false))
        telemetry.publish(report.samples, summary: report.summary, deviceAnswers: false)
        s = Self.series(String(decoding: exposition.render(), as: UTF8.self))
        #expect(s["virtio_vfio_blk_requests_total{\(d),queue=\"0\",op=\"read\"}"] == "9")
        #expect(s["virtio_vfio_nbd_clients{\(d)}"] == "2.0")
        #expect(s["virtio_vfio_device_answering{\(d)}"] == "0.0")
        #expect(report.summary.hasSuffix("device not answering (recovering)"))
    }

    @Test("every service's samples in one registry: one type and one help text per name")
    func allServicesTogether() {
        let telemetry = ServiceTelemetry()
        let exposition = MetricsExposition(telemetry: telemetry, device: "x")
        var device = NetCounters()
        device.rxPackets = 5
        device.rxBadHeader = 1
        var bridge = TapBridgeCounters()
        bridge.fromTapDroppedSize = 4
        let samples = ServiceReports.block(Self.blockStatus(reads: 1, writes: 1, bytesRead: 1, clients: 1)).samples
            + ServiceReports.entropy(fed: 64, reads: 4, recoveries: 0).samples
            + ServiceReports.net(device: device, bridge: bridge).samples
        telemetry.publish(samples, summary: "", deviceAnswers: true)
        let text = String(decoding: exposition.render(), as: UTF8.self)
        let s = Self.series(text)
        #expect(s["virtio_vfio_rng_bytes_total{device=\"x\",queue=\"0\"}"] == "64")
        #expect(s["virtio_vfio_net_frames_total{device=\"x\",queue=\"0\"}"] == "5")
        #expect(s["virtio_vfio_net_dropped_frames_total{device=\"x\",reason=\"rx_bad_header\"}"] == "1")
        #expect(s["virtio_vfio_net_dropped_frames_total{device=\"x\",reason=\"from_tap_size\"}"] == "4")
        // One TYPE line per family, although three services report device_recoveries.
        #expect(text.split(separator: "\n").filter { $0 == "# TYPE virtio_vfio_device_recoveries_total counter" }.count == 1)
        // Every qualified name fits the control socket's counter message.
        #expect(telemetry.namedCounters.allSatisfy { $0.0.utf8.count <= 64 })
    }

    @Test("latency histograms count what is recorded, in doubling buckets from 16 µs")
    func latency() {
        let exposition = MetricsExposition(telemetry: ServiceTelemetry(), device: "x")
        let h = exposition.latencyHistogram("blk_request_duration", labels: [("op", "read")], help: "request to reply")
        h.recordNanoseconds(20_000)
        h.recordNanoseconds(3_000_000)
        let s = Self.series(String(decoding: exposition.render(), as: UTF8.self))
        #expect(s["virtio_vfio_blk_request_duration_seconds_count{device=\"x\",op=\"read\"}"] == "2")
        #expect(s["virtio_vfio_blk_request_duration_seconds_bucket{device=\"x\",op=\"read\",le=\"0.000016\"}"] == "0")
        #expect(s["virtio_vfio_blk_request_duration_seconds_bucket{device=\"x\",op=\"read\",le=\"0.000032\"}"] == "1")
        #expect(s["virtio_vfio_blk_request_duration_seconds_bucket{device=\"x\",op=\"read\",le=\"+Inf\"}"] == "2")
    }

    /// One HTTP/1.1 request over a fresh TCP connection to 127.0.0.1:`port`; the whole answer.
    static func get(_ port: Int, _ request: String) -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { Glibc.close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        address.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { return "connect failed: errno \(errno)" }
        _ = Array(request.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            answer += buffer[..<n]
        }
        return String(decoding: answer, as: UTF8.self)
    }

    @Test("GET /metrics over TCP: 200 with the exposition; another path 404; POST 405")
    func http() throws {
        let telemetry = ServiceTelemetry()
        let report = ServiceReports.entropy(fed: 128, reads: 8, recoveries: 0)
        telemetry.publish(report.samples, summary: report.summary, deviceAnswers: true)
        let server = try MetricsHTTPServer(host: "127.0.0.1", port: 0, exposition: MetricsExposition(telemetry: telemetry, device: "0000:00:04.0"))
        defer { server.close() }
        #expect(server.port > 0)
        let ok = Self.get(server.port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(ok.hasPrefix("HTTP/1.1 200 OK"))
        #expect(ok.contains("content-type: text/plain; version=0.0.4") || ok.contains("Content-Type: text/plain; version=0.0.4"))
        #expect(ok.contains("virtio_vfio_rng_bytes_total{device=\"0000:00:04.0\",queue=\"0\"} 128"))
        let missing = Self.get(server.port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(missing.hasPrefix("HTTP/1.1 404"))
        let post = Self.get(server.port, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        #expect(post.hasPrefix("HTTP/1.1 405"))
    }

    @Test("two endpoints on one port (SO_REUSEPORT): the new driver listens before the old one exits")
    func samePortTwice() throws {
        let telemetry = ServiceTelemetry()
        let first = try MetricsHTTPServer(host: "127.0.0.1", port: 0, exposition: MetricsExposition(telemetry: telemetry, device: "a"))
        defer { first.close() }
        let second = try MetricsHTTPServer(host: "127.0.0.1", port: first.port, exposition: MetricsExposition(telemetry: telemetry, device: "a"))
        first.close()
        #expect(Self.get(second.port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").hasPrefix("HTTP/1.1 200 OK"))
        second.close()
    }

    @Test("the watchdog test: answered only within the window after a look that found the device answering")
    func answered() {
        let telemetry = ServiceTelemetry()
        #expect(!telemetry.answered(within: 1_000_000_000))
        telemetry.publish([], summary: "", deviceAnswers: false)
        #expect(!telemetry.answered(within: 1_000_000_000))
        telemetry.publish([], summary: "", deviceAnswers: true)
        let now = monotonicNanoseconds()
        #expect(telemetry.answered(within: 1_000_000_000, now: now))
        #expect(!telemetry.answered(within: 1_000_000_000, now: now + 2_000_000_000))
    }
}

@Suite("Metrics endpoint: fixed samples")
struct FixedSampleTests {
    @Test("a takeover's samples: upgrades_total by mode and the last gap in seconds, beside the loop's")
    func takeover() {
        let telemetry = ServiceTelemetry()
        let exposition = MetricsExposition(telemetry: telemetry, device: "d")
        telemetry.setFixed(TelemetrySample("upgrades", .counter, 1, labels: [.init("mode", "live")], help: "h"))
        telemetry.setFixed(TelemetrySample("last_upgrade_gap", .seconds, 48_112_200, help: "g"))
        telemetry.publish(ServiceReports.entropy(fed: 1, reads: 1, recoveries: 0).samples, summary: "", deviceAnswers: true)
        let text = String(decoding: exposition.render(), as: UTF8.self)
        let s = MetricsEndpointTests.series(text)
        #expect(s["virtio_vfio_upgrades_total{device=\"d\",mode=\"live\"}"] == "1", "\(text)")
        #expect(s["virtio_vfio_last_upgrade_gap_seconds{device=\"d\"}"] == "0.0481122")
    }
}
