import HotUpgrade
import NBD
import VirtioDevices

/// What each service publishes at its status looks (`ServiceTelemetry`): its counters as samples
/// (the metrics endpoint's families, `info`'s counters) and the one-line summary of the service
/// manager's STATUS. Built from counters the loops keep anyway; nothing here runs per request.
public enum ServiceReports {
    typealias Label = TelemetrySample.Label

    /// `serve blk`: the NBD server's counters. The virtio-blk driver has one request queue
    /// (queue 0), which every NBD request goes through.
    public static func block(_ s: NBDServerStatus) -> (samples: [TelemetrySample], summary: String) {
        let st = s.statistics
        let q = Label("queue", "0")
        let ops: [(String, Int)] = [("read", st.reads), ("write", st.writes), ("flush", st.flushes), ("trim", st.trims),
                                    ("write_zeroes", st.writeZeroes)]
        var samples = ops.map {
            TelemetrySample("blk_requests", .counter, $0.1, labels: [q, Label("op", $0.0)], help: "NBD requests answered, by operation")
        }
        samples += [
            TelemetrySample("blk_bytes", .counter, Int(clamping: st.bytesRead), labels: [q, Label("direction", "read")],
                            help: "Bytes read or written by answered requests"),
            TelemetrySample("blk_bytes", .counter, Int(clamping: st.bytesWritten), labels: [q, Label("direction", "write")],
                            help: "Bytes read or written by answered requests"),
            TelemetrySample("blk_error_replies", .counter, st.errorReplies, help: "Replies carrying an NBD error"),
            TelemetrySample("blk_requests_in_flight", .gauge, s.inFlight, labels: [q], help: "Requests in the device now"),
            TelemetrySample("nbd_clients", .gauge, s.connectedClients, help: "NBD connections negotiating or in transmission"),
            TelemetrySample("nbd_connections_accepted", .counter, st.connectionsAccepted, help: "NBD connections accepted"),
            TelemetrySample("nbd_connections_refused", .counter, st.connectionsRefused,
                            help: "NBD connections refused because the client limit was reached"),
            TelemetrySample("nbd_connections_adopted", .counter, st.connectionsAdopted,
                            help: "NBD connections taken over from the previous driver"),
            TelemetrySample("nbd_protocol_violations", .counter, st.protocolViolations,
                            help: "NBD connections closed for breaking the protocol"),
            TelemetrySample("device_recoveries", .counter, s.backend.recoveries, help: "Times the device was brought back by reset"),
            TelemetrySample("device_answering", .gauge, s.backend.answering ? 1 : 0,
                            help: "1 while the device answers, 0 while it waits for a recovery"),
        ]
        let clients = s.connectedClients == 1 ? "1 NBD client" : "\(s.connectedClients) NBD clients"
        let health = s.backend.answering ? "" : ", device not answering (recovering)"
        return (samples, "\(clients), \(st.reads) reads, \(st.writes) writes, \(st.errorReplies) errors, \(s.backend.recoveries) recoveries\(health)")
    }

    /// `serve blk --ublk`: the ublk export's requests (they go through the same queue 0 as NBD's).
    public static func ublk(_ u: UBlkStatistics, deviceID: UInt32, live: Bool) -> (samples: [TelemetrySample], summary: String) {
        let ops: [(String, Int)] = [("read", u.reads), ("write", u.writes), ("flush", u.flushes), ("discard", u.discards),
                                    ("write_zeroes", u.writeZeroes)]
        var samples = ops.map {
            TelemetrySample("ublk_requests", .counter, $0.1, labels: [Label("op", $0.0)], help: "ublk requests given to the device, by operation")
        }
        samples += [
            TelemetrySample("ublk_bytes", .counter, Int(clamping: u.bytesRead), labels: [Label("direction", "read")],
                            help: "Bytes of ublk reads and writes given to the device"),
            TelemetrySample("ublk_bytes", .counter, Int(clamping: u.bytesWritten), labels: [Label("direction", "write")],
                            help: "Bytes of ublk reads and writes given to the device"),
            TelemetrySample("ublk_refused", .counter, u.refused, help: "ublk requests answered with an error without reaching the device"),
            TelemetrySample("ublk_failed", .counter, u.failed, help: "ublk requests the device completed with an error"),
            TelemetrySample("ublk_serving", .gauge, live ? 1 : 0, help: "1 once the kernel serves /dev/ublkbN through this driver"),
        ]
        return (samples, "/dev/ublkb\(deviceID) \(live ? "serving" : "starting"): \(u.reads) reads, \(u.writes) writes")
    }

    /// `serve rng`: bytes fed and device reads.
    public static func entropy(fed: Int, reads: Int, recoveries: Int) -> (samples: [TelemetrySample], summary: String) {
        let q = Label("queue", "0")
        return ([
            TelemetrySample("rng_requests", .counter, reads, labels: [q], help: "Entropy requests the device answered"),
            TelemetrySample("rng_bytes", .counter, fed, labels: [q], help: "Entropy bytes fed to the sink"),
            TelemetrySample("device_recoveries", .counter, recoveries, help: "Times the device was brought back by reset"),
            TelemetrySample("device_answering", .gauge, 1, help: "1 while the device answers, 0 while it waits for a recovery"),
        ], "\(fed) bytes fed, \(reads) reads, \(recoveries) recoveries")
    }

    /// `serve net`: frames and bytes per queue (receive queue 0, transmit queue 1), drops by
    /// reason, the bridge's backpressure.
    public static func net(device d: NetCounters, bridge b: TapBridgeCounters) -> (samples: [TelemetrySample], summary: String) {
        let rx = Label("queue", "0"), tx = Label("queue", "1")
        func frames(_ v: Int, _ q: Label) -> TelemetrySample {
            TelemetrySample("net_frames", .counter, v, labels: [q], help: "Frames the device received (queue 0) or transmitted (queue 1)")
        }
        func bytes(_ v: Int, _ q: Label) -> TelemetrySample {
            TelemetrySample("net_bytes", .counter, v, labels: [q], help: "Bytes the device received (queue 0) or transmitted (queue 1)")
        }
        let drops: [(String, Int)] = [
            ("rx_short_used_length", d.rxShortUsedLength), ("rx_bad_num_buffers", d.rxBadNumBuffers), ("rx_bad_header", d.rxBadHeader),
            ("rx_bad_length", d.rxBadLength), ("tx_lost_to_reset", d.txLostToReset), ("to_tap_full", b.toTapDroppedFull),
            ("to_tap_error", b.toTapErrors), ("from_tap_size", b.fromTapDroppedSize), ("from_tap_header", b.fromTapDroppedHeader),
            ("from_tap_ring", b.fromTapDroppedRing),
        ]
        var samples = [frames(d.rxPackets, rx), bytes(d.rxBytes, rx), frames(d.txPackets, tx), bytes(d.txBytes, tx)]
        samples += drops.map {
            TelemetrySample("net_dropped_frames", .counter, $0.1, labels: [Label("reason", $0.0)], help: "Frames dropped, by reason")
        }
        samples += [
            TelemetrySample("net_transmit_ring_full", .counter, b.transmitRingFull,
                            help: "Times the TAP was left unread because every transmit slot was in flight"),
            TelemetrySample("net_tap_read_errors", .counter, b.tapReadErrors, help: "Failed reads of the TAP"),
            TelemetrySample("net_link_changes", .counter, d.linkChanges, help: "Changes of the device's link status"),
            TelemetrySample("net_broken_rings", .counter, d.brokenRings, help: "Rings the device broke (recovered by reset)"),
            TelemetrySample("device_recoveries", .counter, d.recoveries, help: "Times the device was brought back by reset"),
            TelemetrySample("device_answering", .gauge, 1, help: "1 while the device answers, 0 while it waits for a recovery"),
        ]
        let dropped = drops.reduce(0) { $0 + $1.1 }
        return (samples, "\(d.rxPackets) frames in, \(d.txPackets) out, \(dropped) dropped, \(d.recoveries) recoveries")
    }
}
