import SystemPackage

/// `strerror`-style text for an errno value, e.g. "Permission denied (errno 13)".
public func describeErrno(_ code: Int32) -> String {
    "\(Errno(rawValue: code)) (errno \(code))"
}
