#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import Syscalls
import SystemPackage

/// The output side of a connection: handshake replies, then simple replies (header, and a READ's
/// data straight from the backend's memory), several per sendmsg, partial sends resumed.
extension NBDServer where B: ~Copyable {
    mutating func queueReply(_ i: Int, _ r: Int32) {
        clients[i].appendReady(r)
    }

    /// Sends what is queued until done or the socket is full.
    mutating func sendOutput(_ i: Int) {
        if clients[i].hasHandshakeOutput {
            sendHandshakeOutput(i)
            // Replies to requests sent right after NBD_OPT_GO follow its acknowledgement.
            if clients[i].hasHandshakeOutput || clients[i].phase != .transmission { return }
        }
        while clients[i].readyHead >= 0 {
            // Gather up to `repliesPerSend` replies: header (+ data) each, skipping what was sent.
            var vectorCount = 0, total = 0, replies = 0
            var r = clients[i].readyHead
            var skip = clients[i].sendOffset
            while r >= 0 && replies < Self.repliesPerSend {
                let request = clients[i].requests[Int(r)]
                let header = headerScratch + replies * NBDProtocol.simpleReplyHeaderSize
                NBDSimpleReply.write(error: request.error, cookie: request.cookie, into: header)
                if skip < NBDProtocol.simpleReplyHeaderSize {
                    vectors[vectorCount] = iovec(iov_base: header + skip, iov_len: NBDProtocol.simpleReplyHeaderSize - skip)
                    vectorCount += 1
                    total += NBDProtocol.simpleReplyHeaderSize - skip
                    skip = 0
                } else {
                    skip -= NBDProtocol.simpleReplyHeaderSize
                }
                if request.sendsData {
                    let data = backend.memory(of: request.buffer).baseAddress!
                    vectors[vectorCount] = iovec(iov_base: data + skip, iov_len: request.length - skip)
                    vectorCount += 1
                    total += request.length - skip
                    skip = 0
                }
                replies += 1
                r = request.next
            }
            let sent: Int
            switch SocketSyscall.send(clients[i].fd, vectors, vectorCount) {
            case .success(let n): sent = n
            case .failure(let e) where e.rawValue == EAGAIN: sent = 0
            case .failure(let e):
                close(i, "send failed: \(e)")
                return
            }
            if sent > 0 { clients[i].lastActivity = now }
            var left = sent
            while left > 0 {
                let head = clients[i].readyHead
                let request = clients[i].requests[Int(head)]
                let size = NBDProtocol.simpleReplyHeaderSize + (request.sendsData ? request.length : 0)
                let remaining = size - clients[i].sendOffset
                if left < remaining {
                    clients[i].sendOffset += left
                    break
                }
                left -= remaining
                clients[i].sendOffset = 0
                replySent(i, clients[i].popReady())
            }
            if sent < total {
                clients[i].waitingToSend = true
                return
            }
        }
        clients[i].waitingToSend = false
    }

    /// A reply is out: count it, release a READ's buffer, free the slot (which may let the
    /// client's input go on).
    mutating func replySent(_ i: Int, _ r: Int32) {
        let request = clients[i].requests[Int(r)]
        switch request.command {
        case NBDProtocol.Command.read:
            statistics.reads += 1
            if request.error == 0 { statistics.bytesRead += UInt64(request.length) }
        case NBDProtocol.Command.write:
            statistics.writes += 1
            if request.error == 0 { statistics.bytesWritten += UInt64(request.length) }
        case NBDProtocol.Command.flush: statistics.flushes += 1
        case NBDProtocol.Command.trim: statistics.trims += 1
        case NBDProtocol.Command.writeZeroes: statistics.writeZeroes += 1
        default: break
        }
        if request.error != 0 { statistics.errorReplies += 1 }
        if let answered = configuration.requestAnswered, request.received != 0 {
            answered(request.command, now &- request.received)
        }
        if request.hasBuffer { releaseBuffer(i, r) }
        let wasFull = clients[i].freeHead < 0
        clients[i].freeSlot(r)
        if wasFull && clients[i].inputOpen { clients[i].pumpAgain = true }
    }

    mutating func sendHandshakeOutput(_ i: Int) {
        let c = clients[i]
        vectors[0] = iovec(iov_base: c.outBase + c.outStart, iov_len: c.outEnd - c.outStart)
        switch SocketSyscall.send(c.fd, vectors, 1) {
        case .success(let n):
            if n > 0 { clients[i].lastActivity = now }
            clients[i].outStart += n
        case .failure(let e) where e.rawValue == EAGAIN:
            break
        case .failure(let e):
            close(i, "send failed: \(e)")
            return
        }
        if clients[i].outStart < clients[i].outEnd {
            clients[i].waitingToSend = true
            return
        }
        clients[i].outStart = 0
        clients[i].outEnd = 0
        clients[i].waitingToSend = false
        // The next option may be read now; after the final reply the transmission phase starts.
        if clients[i].inputOpen { clients[i].pumpAgain = true }
    }
}
