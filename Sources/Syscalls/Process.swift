import CVirtioShim
#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// How a child process ended (waitpid(2)'s status, decoded).
public enum ChildExit: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case killed(signal: Int32)

    public var description: String {
        switch self {
        case .exited(let status): return "exited with status \(status)"
        case .killed(let signal): return "was killed by signal \(signal)"
        }
    }
}

extension Syscall {
    /// posix_spawn(3) of `arguments[0]` with `arguments`, in a session of its own (it outlives
    /// the caller's terminal), stdin from /dev/null, stdout and stderr the caller's (stdout the
    /// caller's stderr with `stdoutToStderr`), the caller's environment, no signal blocked. Every
    /// other descriptor of this process is close-on-exec.
    @inline(never)
    public static func spawn(_ arguments: [String], stdoutToStderr: Bool = false) -> Result<pid_t, Errno> {
        precondition(!arguments.isEmpty, "spawn: no program")
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The child starts with no signal blocked and the termination signals at their defaults,
        // whatever the calling thread had (a control thread blocks SIGINT, SIGTERM and SIGUSR1).
        var none = sigset_t(), defaults = sigset_t()
        sigemptyset(&none)
        sigemptyset(&defaults)
        for signal in [SIGINT, SIGTERM, SIGUSR1, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        // POSIX_SPAWN_SETSID (0x80, glibc 2.26; not exported by the Glibc module), SETSIGMASK, SETSIGDEF.
        posix_spawnattr_setflags(&attributes, Int16(0x80 | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        if stdoutToStderr { posix_spawn_file_actions_adddup2(&actions, 2, 1) }
        // Only 0-2 reach the child: a descriptor a library opened without O_CLOEXEC (a metrics
        // listener, say) would otherwise live on in it, unserved. What a successor needs it is
        // handed over SCM_RIGHTS.
        _ = CVirtioShim_spawn_closefrom(&actions, 3)
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for p in argv { free(p) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, arguments[0], &actions, &attributes, &argv, environ)
        return r == 0 ? .success(pid) : .failure(Errno(rawValue: r))
    }

    /// waitpid(2) with WNOHANG: how child `pid` ended, nil while it runs; ECHILD once it was
    /// reaped (or is not this process's child). EINTR retried.
    @inline(never)
    public static func reap(_ pid: pid_t) -> Result<ChildExit?, Errno> {
        var status: Int32 = 0
        while true {
            let r = Glibc.waitpid(pid, &status, WNOHANG)
            if r == 0 { return .success(nil) }
            if r == pid { return .success(status & 0x7F == 0 ? .exited((status >> 8) & 0xFF) : .killed(signal: status & 0x7F)) }
            if errno != EINTR { return .failure(Errno(rawValue: errno)) }
        }
    }
}
