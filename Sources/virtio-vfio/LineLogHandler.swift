import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The driver's one log format on stderr: "virtio-vfio: LINE", with "error: " or "warning: "
/// before errors and warnings, the same style as every other message of the command line.
struct LineLogHandler: LogHandler {
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        let prefix = switch event.level {
        case .critical, .error: "virtio-vfio: error: "
        case .warning: "virtio-vfio: warning: "
        default: "virtio-vfio: "
        }
        printError(prefix + "\(event.message)")
    }
}

extension GlobalOptions {
    /// The logger of a service: notices and above always (they are what an operator reads),
    /// debug with --verbose.
    func serviceLogger(_ label: String) -> Logger {
        var logger = Logger(label: label) { _ in LineLogHandler(logLevel: .notice) }
        logger.logLevel = verbose ? .debug : .notice
        return logger
    }
}
