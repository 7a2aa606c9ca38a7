import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

/// VIRTIO_VFIO_PARSE_ONLY=1: the command line is parsed and validated exactly as it would be for
/// a run, then named on stdout ("parsed: virtio-vfio blk id") and not run (exit 0); an error is
/// reported as usual (exit 64). Hidden from `--help`; the README's commands are checked with it
/// (Tests/Shell/cli/readme.sh), without a device and without VFIO. Any other value, or none, runs
/// the command.
enum ParseOnly {
    static var requested: Bool {
        guard let value = getenv("VIRTIO_VFIO_PARSE_ONLY") else { return false }
        return String(cString: value) == "1"
    }

    static func report(_ command: ParsableCommand) -> Never {
        let names = path(to: type(of: command), under: VirtioVFIO.self)
            ?? ["virtio-vfio", type(of: command).configuration.commandName ?? "\(type(of: command))"]
        print("parsed: \(names.joined(separator: " "))")
        exit(0)
    }

    /// The command names from `root` down to `command`, or nil if `command` is not below `root`
    /// (ArgumentParser's own `help` command).
    static func path(to command: ParsableCommand.Type, under root: ParsableCommand.Type) -> [String]? {
        let name = root.configuration.commandName ?? "\(root)"
        if command == root { return [name] }
        for sub in root.configuration.subcommands {
            if let below = path(to: command, under: sub) { return [name] + below }
        }
        return nil
    }
}
