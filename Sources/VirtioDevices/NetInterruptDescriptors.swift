/// The eventfds a virtio-net device signals in an interrupt mode, one per MSI-X vector (owned by
/// the transport; valid while it is).
public struct NetInterruptDescriptors: Sendable, Equatable {
    /// Vector 0: receiveq1 used buffers.
    public let receive: Int32
    /// Vector 1: transmitq1 used buffers.
    public let transmit: Int32
    /// Vector 2: configuration changes (link status).
    public let configuration: Int32

    /// `fds` in vector order, as `Transport.enableInterrupts(count: 3)` returns them.
    init(_ fds: [Int32]) {
        precondition(fds.count == 3, "virtio-net uses three vectors")
        receive = fds[0]
        transmit = fds[1]
        configuration = fds[2]
    }
}
