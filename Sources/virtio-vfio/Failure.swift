import ArgumentParser
import PCI
import UBlk
import VFIO
import Virtio
import VirtioPCI
#if canImport(Glibc)
import Glibc
#endif

/// Turns a driver error into one line on stderr and a documented exit code (see `VirtioVFIO`).
enum Failure {
    static let usage: Int32 = 64, noInput: Int32 = 66, unavailable: Int32 = 69, ioError: Int32 = 74
    static let busy: Int32 = 75, protocolError: Int32 = 76, permission: Int32 = 77

    static func exit(_ error: Error) -> ExitCode {
        printError("virtio-vfio: error: \(error)")
        return ExitCode(code(for: error))
    }

    /// Ends the command on an error from parsing or running it, in the one style of this command
    /// line: help, `--version` and completion scripts as ArgumentParser prints them (stdout, exit 0);
    /// an `ExitCode` silently (its message was printed where it arose); a usage error (ArgumentParser's
    /// own or a `ValidationError`) as "virtio-vfio: error: MESSAGE" followed by ArgumentParser's help
    /// and usage lines, exit 64; any other error as "virtio-vfio: error: ERROR" with `code(for:)`.
    static func end(_ error: Error) -> Never {
        let exitCode = VirtioVFIO.exitCode(for: error)
        if exitCode == .success || error is ExitCode { VirtioVFIO.exit(withError: error) }
        guard exitCode == .validationFailure else { Glibc.exit(Failure.exit(error).rawValue) }
        // ArgumentParser's text is "Error: MESSAGE\n[Help: ...\n]Usage: ...": the same lines,
        // with this command line's prefix on the first.
        let message = VirtioVFIO.message(for: error)
        let full = VirtioVFIO.fullMessage(for: error)
        var rest = ""
        if let range = full.range(of: message), full[..<range.lowerBound].hasSuffix("Error: ") {
            rest = String(full[range.upperBound...])
        }
        while rest.hasSuffix("\n") { rest.removeLast() }
        printError("virtio-vfio: error: \(message)" + rest)
        Glibc.exit(exitCode.rawValue)
    }

    static func code(for error: Error) -> Int32 {
        switch error {
        case let e as UBlkError:
            switch e {
            case .unavailable(let errno): return errno.rawValue == EACCES || errno.rawValue == EPERM ? permission : unavailable
            case .command(_, _, let errno):
                if errno.rawValue == EACCES || errno.rawValue == EPERM { return permission }
                return errno.rawValue == EEXIST || errno.rawValue == EBUSY ? busy : ioError
            case .refused: return busy
            case .characterDevice, .ring: return ioError
            }
        case let e as VirtioPCIError:
            switch e {
            case .pci(let p): return code(for: p)
            case .vfio(let v): return code(for: v)
            case .virtio(_, .missingFeature): return unavailable  // the device does not offer what was asked
            case .virtio: return protocolError
            case .notVirtio, .needsIOMMU: return unavailable
            case .mapping: return ioError
            }
        case let e as PCIError:
            switch e {
            case .badAddress: return usage
            case .noSuchDevice: return noInput
            case .unreadable: return ioError
            case .malformedConfigSpace, .malformedVirtioCapability: return protocolError
            }
        case let e as VFIOError:
            switch e {
            case .unavailable, .notBound, .groupNotViable, .apiVersion: return unavailable
            case .open(_, let errno), .ioctl(_, _, let errno):
                if errno == EACCES || errno == EPERM { return permission }
                if errno == EBUSY { return busy }
                if errno == ENOENT || errno == ENODEV { return unavailable }
                return ioError
            case .region, .regionIO, .iovaExhausted, .dma: return ioError
            case .handover: return protocolError
            }
        case is VirtioError: return protocolError
        case is ValidationError: return usage
        default: return 1
        }
    }
}

/// One line on stderr (unbuffered, so it is never lost or reordered behind stdout). When stderr
/// is the journal, the line starts with its syslog priority, taken from the one error style:
/// "virtio-vfio: error: " <3>, "virtio-vfio: warning: " <4>, anything else <6>.
func printError(_ line: String) {
    var text = (stderrIsJournal ? journalPriority(line) : "") + line + "\n"
    text.withUTF8 { bytes in
        var offset = 0
        while offset < bytes.count {
            let n = write(2, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            offset += n
        }
    }
}

/// Whether stderr is a stream to systemd's journal: $JOURNAL_STREAM ("DEVICE:INODE") names the
/// descriptor systemd connected (a successor inherits both, so its lines are marked too). Then
/// "<N>" before a line is its priority (sd-daemon(3)); elsewhere it would be noise.
let stderrIsJournal: Bool = {
    guard let raw = getenv("JOURNAL_STREAM") else { return false }
    let parts = String(cString: raw).split(separator: ":")
    var st = stat()
    guard parts.count == 2, let device = UInt64(parts[0]), let inode = UInt64(parts[1]), fstat(2, &st) == 0 else { return false }
    return UInt64(st.st_dev) == device && UInt64(st.st_ino) == inode
}()

/// "<3>", "<4>" or "<6>" for a line in the command line's one error style.
func journalPriority(_ line: String) -> String {
    if line.hasPrefix("virtio-vfio: error: ") { return "<3>" }
    if line.hasPrefix("virtio-vfio: warning: ") { return "<4>" }
    return "<6>"
}
