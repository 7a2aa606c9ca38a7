// The driver hot path of the ring benchmark: the only code tools/bench-ci's callgrind run collects
// (--toggle-collect on the two symbol names below). Everything else in a round, the wait for the
// used ring and the check of each completion, is outside it.
import Virtio

/// The driver hot path, part 1 (callgrind: `--toggle-collect=virtio_bench_submit`): for up to
/// `count` idle slots, describe one request and `add` it, then `publish` once.
/// Returns how many were added.
@inline(never) @_silgen_name("virtio_bench_submit")
func ringBenchSubmit(_ bench: inout RingBench, _ count: Int) throws(VirtioError) -> Int {
    var added = 0
    let segments = bench.segments
    let segmentCount: Int
    let bufferSize = bench.options.bufferSize
    let isBlk = bench.options.device == .blk
    segmentCount = isBlk ? 3 : 1
    while added < count, let slot = bench.idle.pop() {
        let buffer = bench.slots.pointer + slot * bench.stride
        let address = bench.slots.deviceAddress + UInt64(slot * bench.stride)
        if isBlk {
            // struct virtio_blk_req (spec 5.2.6): le32 type (IN = 0), le32 reserved, le64 sector;
            // data; u8 status, set to an invalid value so a request the device skipped shows.
            let header = buffer + bufferSize
            header.storeBytes(of: UInt32(0), as: UInt32.self)
            header.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            header.storeBytes(of: bench.blkSector(bench.submitted).littleEndian, toByteOffset: 8, as: UInt64.self)
            header.storeBytes(of: UInt8(0xFF), toByteOffset: RingBench.blkHeader, as: UInt8.self)
            segments[0] = BufferSegment(address: address + UInt64(bufferSize), length: UInt32(RingBench.blkHeader), deviceWritable: false)
            segments[1] = BufferSegment(address: address, length: UInt32(bufferSize), deviceWritable: true)
            segments[2] = BufferSegment(address: address + UInt64(bufferSize + RingBench.blkHeader), length: 1, deviceWritable: true)
        } else {
            segments[0] = BufferSegment(address: address, length: UInt32(bufferSize), deviceWritable: true)
        }
        let token = bench.submitted << 16 | UInt64(slot)
        guard try bench.queue.add(UnsafeBufferPointer(start: segments, count: segmentCount), token: token) else {
            bench.idle.push(slot)
            break
        }
        bench.submitted += 1
        added += 1
    }
    if bench.queue.publish() { bench.doorbells += 1 }
    return added
}

/// The driver hot path, part 2 (callgrind: `--toggle-collect=virtio_bench_complete`): one
/// `drainUsed`, recording each completion's token and length for `check`.
@inline(never) @_silgen_name("virtio_bench_complete")
func ringBenchComplete(_ bench: inout RingBench) throws(VirtioError) -> Int {
    let tokens = bench.tokens, lengths = bench.lengths
    var pending = bench.pending
    let n = try bench.queue.drainUsed { token, length in
        tokens[pending] = token
        lengths[pending] = length
        pending += 1
    }
    bench.pending = pending
    bench.drains += 1
    return n
}
