import Syscalls

/// One MSI-X vector of the emulated device: an eventfd it signals, as VFIO signals the eventfd
/// of a real vector. The driver polls `raw`; the device owns and closes it.
final class InterruptVector: @unchecked Sendable {
    let event: EventFD

    init() throws {
        event = try EventFD()
    }

    var raw: Int32 { event.raw }
    func signal() { event.signal() }
}
