import Glibc
import Syscalls
import Testing

/// How the serving driver starts its successor (`Syscall.spawn`).
@Suite("spawn")
struct SpawnTests {
    /// Waits (bounded) for `pid` to end.
    func exit(of pid: pid_t) -> ChildExit? {
        for _ in 0..<500 {
            if case .success(let ended?) = Syscall.reap(pid) { return ended }
            usleep(10_000)
        }
        return nil
    }

    @Test("only 0-2 reach the child: a descriptor opened without O_CLOEXEC stays behind")
    func descriptorsStayBehind() throws {
        let leaky = dup(2)  // dup(2) never sets FD_CLOEXEC
        try #require(leaky > 2)
        defer { close(leaky) }
        #expect(fcntl(leaky, F_GETFD) & FD_CLOEXEC == 0)
        let probe = Syscall.spawn(["/bin/sh", "-c", "test -e /proc/self/fd/\(leaky) && exit 3; test -e /proc/self/fd/2 || exit 4; exit 0"])
        guard case .success(let pid) = probe else { Issue.record("spawn: \(probe)"); return }
        #expect(exit(of: pid) == .exited(0))
    }
}
