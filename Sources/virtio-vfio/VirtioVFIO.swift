import ArgumentParser
import Logging

@main
struct VirtioVFIO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtio-vfio",
        abstract: "A userspace driver for virtio-pci devices bound to vfio-pci.",
        discussion: """
            Exit codes: 0 success, 64 bad usage or argument, 66 no such PCI function, \
            69 VFIO unavailable or device not bound to vfio-pci / not virtio, 74 I/O error, \
            75 device busy (held by another process), 76 the device broke the virtio spec, \
            77 permission denied.
            """,
        version: DriverVersion.string,
        subcommands: [ListCommand.self, InfoCommand.self, ResetCommand.self, RngCommand.self, BlkCommand.self, ServeCommand.self, UpgradeCommand.self, BenchCommand.self]
    )

    /// The entry point (instead of ArgumentParser's own `main`): parse, then run, and end every
    /// error the same way, `Failure.end` ("virtio-vfio: error: ..."). With VIRTIO_VFIO_PARSE_ONLY=1
    /// in the environment, a command line that parses is named and not run (`ParseOnly`).
    static func main() {
        var command: ParsableCommand
        do { command = try parseAsRoot(Array(CommandLine.arguments.dropFirst())) } catch { Failure.end(error) }
        if ParseOnly.requested { ParseOnly.report(command) }
        do { try command.run() } catch { Failure.end(error) }
    }
}

/// Options every subcommand takes.
struct GlobalOptions: ParsableArguments {
    @Flag(name: .shortAndLong, help: "Log what the driver does (to stderr).")
    var verbose = false

    @Option(name: .customLong("sysfs"), help: ArgumentHelp("Root of the sysfs tree (for tests).", visibility: .hidden))
    var sysfsRoot = "/sys"

    func makeLogger(_ label: String) -> Logger {
        var logger = Logger(label: label) { StreamLogHandler.standardError(label: $0) }
        logger.logLevel = verbose ? .debug : .warning
        return logger
    }
}
