/// Why a hot upgrade did not happen, as the successor or the serving driver sees it. Each case
/// carries one line naming what failed; `kind` says which exit status the command line gives it.
public struct UpgradeError: Error, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable {
        /// Nobody serves the device, or the device or a resource it needs is not there.
        case unavailable
        /// The serving driver refused (another handover runs, it could not quiesce) or took the device back.
        case busy
        /// The other side broke the protocol, sent a record this build cannot use, or the device
        /// did not come up: the upgrade was declined and the old driver resumes.
        case protocolError
        /// A local resource failed (a socket, an eventfd, memory).
        case ioError
    }

    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
