import Testing
import Virtio
import VirtioEmulator

/// The emulated virtio-net device (spec 5.1) driven by the test ring, not by the driver.
@Suite("network device (spec 5.1)")
struct NetTests {
    static let header = 12

    func header(flags: UInt8 = 0, gso: UInt8 = 0, csumStart: UInt16 = 0, csumOffset: UInt16 = 0) -> [UInt8] {
        // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers (§5.1.6)
        [flags, gso, 0, 0, 0, 0, UInt8(csumStart & 0xFF), UInt8(csumStart >> 8), UInt8(csumOffset & 0xFF), UInt8(csumOffset >> 8), 0, 0]
    }

    @Test func configurationSpaceLayout() throws {
        let device = EmulatedDevice(model: .net(mac: [2, 3, 4, 5, 6, 7], mtu: 9000, pairs: 4))
        let t = EmulatedTransport(device: device)
        #expect((0..<6).map { t.readDeviceConfig($0, width: 1) } == [2, 3, 4, 5, 6, 7])
        #expect(t.readDeviceConfig(6, width: 2) == 1)       // status: LINK_UP
        #expect(t.readDeviceConfig(8, width: 2) == 4)       // max_virtqueue_pairs
        #expect(t.readDeviceConfig(10, width: 2) == 9000)   // mtu
        #expect(t.queueCount() == 9)                        // 4 pairs + controlq
        let generation = t.configGeneration()
        device.setLink(up: false)
        #expect(t.readDeviceConfig(6, width: 2) == 0 && t.configGeneration() != generation)
    }

    @Test func transmitIsCapturedAndHeadersTheFeaturesForbidAreViolations() throws {
        let r = try Rig(.net(), wanted: [], queue: 1)
        let good = try r.buffer(Self.header + 60)
        fill(good, header() + [UInt8](repeating: 0xAB, count: 60))
        r.ring.submit([.readable(good)])
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == 0)
        // NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated, and a device-writable part.
        let bad = try r.buffer(Self.header + 60)
        fill(bad, header(flags: 1, csumStart: 14, csumOffset: 6) + [UInt8](repeating: 0xCD, count: 60))
        let junk = try r.buffer(4)
        r.ring.submit([.readable(bad), .writable(junk)])
        #expect(r.ring.waitUsed(2))
        let frames = r.device.takeTransmitted()
        #expect(frames.map(\.frame) == [[UInt8](repeating: 0xAB, count: 60), [UInt8](repeating: 0xCD, count: 60)])
        #expect(frames[1].header.flags == 1 && frames[1].header.checksumStart == 14)
        #expect(r.device.hasViolation("VIRTIO_NET_F_CSUM not negotiated (§5.1.6.2.1)"))
        #expect(r.device.hasViolation("device-writable bytes; transmit buffers are device-readable"))
    }

    @Test func mergeableReceiveSpreadsAFrameAndCountsTheBuffers() throws {
        let r = try Rig(.net(), wanted: NetFeature.mrgRxbuf, queue: 0)
        let buffers = try (0..<3).map { _ in try r.buffer(512) }
        for b in buffers { r.ring.submit([.writable(b)]) }
        let frame = (0..<1200).map { UInt8(truncatingIfNeeded: $0) }
        #expect(r.device.injectFrame(frame))
        #expect(r.ring.waitUsed(3))
        #expect((0..<3).map { r.ring.usedElement(UInt16($0)).length } == [512, 512, 1212 - 1024])
        let all = buffers.flatMap(bytes)
        #expect(all[10] == 3 && all[11] == 0)  // num_buffers = 3 (§5.1.6.4)
        #expect(Array(all[Self.header..<(Self.header + 1200)]) == frame)
        #expect(r.device.violations.isEmpty, "\(r.device.violations)")
    }

    @Test func withoutMergeableBuffersAFrameTooLargeForTheBufferIsDropped() throws {
        let r = try Rig(.net(), wanted: [], queue: 0)
        let small = try r.buffer(100)
        r.ring.submit([.writable(small)])
        r.device.injectFrame([UInt8](repeating: 1, count: 200))
        r.device.injectFrame([UInt8](repeating: 2, count: 80))
        #expect(r.ring.waitUsed(1))
        #expect(r.ring.usedElement(0).length == UInt32(Self.header + 80))
        #expect(r.device.netStatistics.framesTooLarge == 1 && r.device.netStatistics.framesDelivered == 1)
        #expect(bytes(small)[10] == 1)  // num_buffers is 1 without MRG_RXBUF
    }

    @Test func aReceiveBufferWithReadablePartsBreaksTheQueue() throws {
        let r = try Rig(.net(), wanted: [], queue: 0)
        let a = try r.buffer(16), b = try r.buffer(2000)
        r.ring.submit([.readable(a), .writable(b)])
        r.device.injectFrame([UInt8](repeating: 1, count: 60))
        #expect(poll { r.device.readStatus().contains(.deviceNeedsReset) })
        #expect(r.device.queueFailure(0)?.contains("receive buffers are device-writable") == true)
    }

    @Test func controlRxNeedsItsFeatureAndIsAcked() throws {
        for (wanted, expected) in [(NetFeature.ctrlVQ.union(NetFeature.ctrlRx), UInt8(0)), (NetFeature.ctrlVQ, UInt8(1))] {
            let r = try Rig(.net(), wanted: wanted, queue: 2)
            let command = try r.buffer(3), ack = try r.buffer(1)
            fill(command, [0, 0, 1])  // VIRTIO_NET_CTRL_RX, PROMISC, on
            r.ring.submit([.readable(command), .writable(ack)])
            #expect(r.ring.waitUsed(1))
            #expect(bytes(ack) == [expected] && r.ring.usedElement(0).length == 1)
            #expect(r.device.netStatistics.promiscuous == (expected == 0))
            #expect(r.device.hasViolation("without VIRTIO_NET_F_CTRL_RX") == (expected == 1))
        }
    }
}
