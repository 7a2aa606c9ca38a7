/// NBD: an NBD server for one block device.
///
/// What this module owns:
/// - `BlockBackend` (BlockBackend.swift): the contract between the server and a driver.
/// - The protocol as pure functions over bytes, so tests and fuzzers drive them directly:
///   constants (`NBDProtocol`, Protocol.swift), the fixed newstyle handshake (`NBDHandshake`,
///   `NBDExport`, Handshake.swift), request headers, simple replies and the decision for each
///   request (`NBDRequest.action(for:)`, Requests.swift).
/// - `NBDServer` (NBDServer.swift, ServerInput.swift, ServerOutput.swift, ClientState.swift): a
///   single-threaded poll(2) loop serving many connections over UNIX and TCP sockets
///   (Listener.swift), with the socket system calls in `SocketSyscall` (Syscalls module).
/// - Hand-over to a new process (driver hot upgrade): quiescing, `handoverState()`, `release()`
///   and `init(adopting:)` (Handover.swift), and the validated, versioned `NBDHandoverState`
///   with its encoding (HandoverState.swift, written with Upgrade's codec like every handover blob).
///
/// Protocol reference: doc/proto.md of github.com/NetworkBlockDevice/nbd.
enum NBDModule {}
