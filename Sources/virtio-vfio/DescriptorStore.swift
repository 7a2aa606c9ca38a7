import ArgumentParser
import HotUpgrade
import PCI
import Syscalls
import Upgrade
import VFIO
import Virtio
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// `--fd-store`: the device's descriptors kept in the service manager's file descriptor store
/// (sd_notify FDSTORE=1; the unit sets FileDescriptorStoreMax=), so a driver restarted after a
/// crash gets them back instead of opening the device again: the VFIO container, group and
/// device, the DMA memfd (whose mapping in the container, and so the rings and buffers the device
/// uses, outlive the crash), the MSI-X eventfds, and the service's listening sockets (clients
/// that reconnect meanwhile wait in the backlog instead of being refused). The restarted driver
/// adopts the device without a reset when its rings check out (`CrashRecovery`), else resets it.
///
/// Names (FDNAME; no ':' allowed): vfio-container, vfio-group, vfio-device, vfio-dma-IOVA (the
/// memfd; IOVA in hex, its size is the file's), msix (the eventfds, in vector order), and the
/// service's own (nbd-unix). Every driver stores its set once it serves, after removing the
/// names first (a successor replaces its predecessor's entries; the manager drops duplicates of
/// one open file anyway); a driver that stops cleanly removes them before it exits, so the
/// manager holds nothing of the device when the unit gives it back to its kernel driver.
struct DescriptorStoreOptions: ParsableArguments {
    @Flag(help: "Keep the device's descriptors in the service manager's file descriptor store (the units set FileDescriptorStoreMax=), so a restart after a crash adopts the device instead of opening and resetting it.")
    var fdStore = false
    @Option(help: "With --fd-store, what a restart does with the device it gets back: adopt (when its rings check out, else reset) or reset.")
    var afterCrash: AfterCrash = .adopt

    enum AfterCrash: String, CaseIterable, ExpressibleByArgument { case adopt, reset }
}

/// What one driver keeps in the store.
struct StoredSet {
    var groups: [(name: String, fds: [Int32])]

    /// The device part's descriptors by role, then `extra` (the service's sockets).
    init(_ part: DevicePart, extra: [(name: String, fd: Int32)] = []) {
        let fds = { (role: StateRecord.DescriptorRole) in part.descriptors.filter { $0.role == role }.map(\.fd) }
        groups = [("vfio-container", fds(.container)), ("vfio-group", fds(.group)), ("vfio-device", fds(.device)),
                  (DescriptorStore.dmaName(iova: part.record.dmaIOVA), fds(.dmaMemory)), ("msix", fds(.interrupt))]
        groups += extra.map { ($0.name, [$0.fd]) }
        groups.removeAll { $0.fds.isEmpty }
    }
}

enum DescriptorStore {
    static func dmaName(iova: UInt64) -> String { "vfio-dma-\(String(iova, radix: 16))" }

    /// Replaces this device's entries in the store with `set` (nothing without a manager).
    static func keep(_ set: StoredSet) {
        guard ServiceManager.notifySocket != nil else { return }
        forget(set)
        for group in set.groups {
            if case .failure(let e) = ServiceManager.notify(["FDSTORE=1", "FDNAME=\(group.name)"], descriptors: group.fds) {
                printError("virtio-vfio: warning: storing \(group.name) in the service manager: \(e) (a restart after a crash will reset the device)")
            }
        }
    }

    /// Removes this device's entries (a clean stop: the unit gives the device back next).
    static func forget(_ set: StoredSet) {
        guard ServiceManager.notifySocket != nil else { return }
        for group in set.groups { tellServiceManager(["FDSTOREREMOVE=1", "FDNAME=\(group.name)"]) }
    }
}

/// The descriptors the service manager passed at start, owned until the driver has what it
/// needs (the rest are closed).
struct PassedDescriptors: ~Copyable {
    var named: [(name: String, fd: Int32)]

    /// What the manager passed (an empty set without `--fd-store` or without a manager).
    init(_ options: DescriptorStoreOptions) {
        named = options.fdStore ? ServiceManager.takePassedDescriptors() : []
    }

    deinit { for n in named { Syscall.close(n.fd) } }

    /// The first descriptor named `name`, and all named so.
    func first(_ name: String) -> Int32? { named.first { $0.name == name }?.fd }
    func all(_ name: String) -> [Int32] { named.filter { $0.name == name }.map(\.fd) }

    /// Whether the VFIO set is complete: container, group, device and DMA memory.
    var hasDevice: Bool {
        first("vfio-container") != nil && first("vfio-group") != nil && first("vfio-device") != nil && dma != nil
    }

    var dma: (fd: Int32, iova: UInt64)? {
        for n in named where n.name.hasPrefix("vfio-dma-") {
            if let iova = UInt64(n.name.dropFirst("vfio-dma-".count), radix: 16) { return (n.fd, iova) }
        }
        return nil
    }

    /// A transport over duplicates of the kept VFIO descriptors (the originals stay here, so a
    /// second transport can be made if the first went with a failed adoption).
    func transport(_ address: PCIAddress, sysfs: SysfsPCI) throws -> VirtioPCITransport {
        guard let container = first("vfio-container"), let group = first("vfio-group"), let device = first("vfio-device"),
              let dma else {
            throw ValidationError("the service manager's descriptor store lacks a VFIO descriptor of \(address)")
        }
        func dup(_ fd: Int32, _ what: String) throws -> OwnedFD {
            switch Syscall.duplicate(fd) {
            case .success(let copy): return OwnedFD(adopting: copy)
            case .failure(let e): throw ValidationError("duplicating the kept \(what) descriptor: \(e)")
            }
        }
        let size: Int
        switch Syscall.fileSize(dma.fd) {
        case .success(let n): size = n
        case .failure(let e): throw ValidationError("the kept DMA memory: \(e)")
        }
        let groupNumber = try VFIOAvailability.boundGroup(of: sysfs.function(at: address))
        var interrupts = OwnedFDList()
        for fd in all("msix") { interrupts.append(try dup(fd, "MSI-X eventfd")) }
        let handover = VFIOHandover(address: address, container: try dup(container, "container"), group: try dup(group, "group"),
                                    groupNumber: groupNumber, device: try dup(device, "device"), dmaMemory: try dup(dma.fd, "DMA memory"),
                                    dmaIOVA: dma.iova, dmaSize: size, interrupts: interrupts)
        return try VirtioPCITransport(adopting: handover, sysfs: sysfs)
    }

    /// A duplicate of the kept descriptor `name`, taken out of the set (nil if none was kept).
    mutating func take(_ name: String) -> Int32? {
        guard let i = named.firstIndex(where: { $0.name == name }) else { return nil }
        return named.remove(at: i).fd
    }
}

extension CrashRecovery.Outcome {
    /// For the start line: "adopted the rings" or "reset it (why)".
    var summary: String {
        switch self {
        case .adopted: "adopted the device as it ran (no reset)"
        case .reset(let why): "reset it (not adopted: \(why))"
        }
    }
}

extension GlobalOptions {
    /// The device brought up from the descriptors the service manager kept for this restart:
    /// adopted as it runs when its first `queues` queues settle and check out, else reset
    /// (`CrashRecovery.bringUp`). One line says which, and how long it took.
    func recover<D: ~Copyable>(
        _ address: PCIAddress, from passed: borrowing PassedDescriptors, wanted: Features, mode: CompletionMode, queues: Int,
        afterCrash: DescriptorStoreOptions.AfterCrash,
        adopt: (consuming VirtioPCITransport, Features, [QueueSnapshot], Adoption.Verified) throws(VirtioError) -> D,
        start: (consuming VirtioPCITransport) throws(VirtioError) -> D
    ) throws -> D {
        var outcome = CrashRecovery.Outcome.adopted
        let sysfs = SysfsPCI(root: sysfsRoot)
        let began = monotonicNanoseconds()
        let device: D
        do {
            device = try CrashRecovery.bringUp(attach: { try passed.transport(address, sysfs: sysfs) }, wanted: wanted,
                                               vectors: mode.vectorPerQueue(queues), queues: 0..<queues, settle: .seconds(2),
                                               tryAdoption: afterCrash == .adopt, adopt: adopt, start: start, outcome: &outcome)
        } catch let error as VirtioError {
            throw Failure.exit(VirtioPCIError.virtio(address, error))
        } catch {
            printError("virtio-vfio: error: \(address): restarting from the kept descriptors: \(error)")
            throw ExitCode(Failure.ioError)
        }
        printError("\(address): restarted with the descriptors the service manager kept: \(outcome.summary) in \(milliseconds(monotonicNanoseconds() - began))")
        return device
    }
}
