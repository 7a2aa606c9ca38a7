#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import SystemPackage

/// io_uring's system calls (no libc wrapper: through CVirtioShim). The ring itself, its mappings
/// and its entries are the IOUring target's; these only cross into the kernel.
extension Syscall {
    /// io_uring_setup(2): a ring of `entries` submissions (rounded up to a power of two by the
    /// kernel), described back in `parameters`. The descriptor is close-on-exec.
    @inline(never)
    public static func ioUringSetup(entries: UInt32, _ parameters: inout io_uring_params) -> Result<Int32, Errno> {
        let r = CVirtioShim_io_uring_setup(entries, &parameters)
        return r >= 0 ? .success(r) : .failure(Errno(rawValue: -r))
    }

    /// io_uring_enter(2): submits `submit` published entries and, with `waitFor` > 0, waits until
    /// that many completions are in the ring (IORING_ENTER_GETEVENTS). Retried on EINTR, which the
    /// kernel returns only when it consumed no submission. Returns the submissions consumed.
    @inline(never)
    public static func ioUringEnter(_ fd: Int32, submit: UInt32, waitFor: UInt32) -> Result<Int, Errno> {
        let flags: UInt32 = waitFor > 0 ? UInt32(IORING_ENTER_GETEVENTS) : 0
        while true {
            let r = CVirtioShim_io_uring_enter(fd, submit, waitFor, flags, nil, 0)
            if r >= 0 { return .success(Int(r)) }
            if r != -EINTR { return .failure(Errno(rawValue: -r)) }
        }
    }
}
