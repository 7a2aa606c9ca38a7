import Glibc
import Testing
@testable import NBD

/// Real NBD clients on this machine against the server: nbdinfo, nbdcopy (libnbd-bin) and
/// qemu-img (qemu-utils). Each test is skipped, saying why, when its tool is not installed
/// (`apt-get install -y libnbd-bin qemu-utils`).
@Suite("NBD server with real clients")
struct RealClientTests {
    static let nbdinfo = Tool.find("nbdinfo")
    static let nbdcopy = Tool.find("nbdcopy")
    static let qemuImg = Tool.find("qemu-img")

    static func uri(_ server: RunningServer) -> String { "nbd+unix:///?socket=\(server.socketPath)" }

    @Test(.enabled(if: nbdinfo != nil, "nbdinfo is not installed (apt-get install libnbd-bin)"))
    func nbdinfoReportsSizeFlagsAndBlockSizes() throws {
        let server = try RunningServer(MemoryBackendOptions(size: 16 << 20), tcp: true) {
            $0.exportDescription = "memory disk"
        }
        let r = try Self.nbdinfo!.run(["--json", Self.uri(server)])
        #expect(r.status == 0, "\(r.stderr)")
        let json = JSONFields(r.stdout)
        if getenv("NBD_TEST_LOG") != nil { print(r.stdout) }
        #expect(json["export-size"] == "16777216")
        #expect(json["is_read_only"] == "false")
        #expect(json["can_flush"] == "true")
        #expect(json["can_fua"] == "true")
        #expect(json["can_trim"] == "true")
        #expect(json["can_zero"] == "true")
        #expect(json["can_multi_conn"] == "true")
        #expect(json["can_cache"] == "false")
        #expect(json["can_fast_zero"] == "false")
        #expect(json["block_size_minimum"] == "512")
        #expect(json["block_size_preferred"] == "4096")
        #expect(json["block_size_maximum"] == "1048576")
        #expect(json["description"] == "\"memory disk\"")
        #expect(json["protocol"] == "\"newstyle-fixed\"")

        // The same over TCP, and the export list.
        let port = try #require(server.tcpPort)
        let tcp = try Self.nbdinfo!.run(["--size", "nbd://127.0.0.1:\(port)"])
        #expect(tcp.status == 0 && tcp.stdout.trimmingSpaces == "16777216", "\(tcp.stderr)")
        let list = try Self.nbdinfo!.run(["--list", "--json", Self.uri(server)])
        #expect(list.status == 0, "\(list.stderr)")
        #expect(JSONFields(list.stdout)["export-name"] == "\"\"")
        server.stop()
        #expect(server.disk.violations.isEmpty)
    }

    @Test(.enabled(if: nbdinfo != nil, "nbdinfo is not installed (apt-get install libnbd-bin)"))
    func nbdinfoSeesAReadOnlyExport() throws {
        let server = try RunningServer(MemoryBackendOptions(size: 1 << 20, readOnly: true, canTrim: false)) {
            $0.exportName = "ro"
        }
        let r = try Self.nbdinfo!.run(["--json", "nbd+unix:///ro?socket=\(server.socketPath)"])
        #expect(r.status == 0, "\(r.stderr)")
        let json = JSONFields(r.stdout)
        #expect(json["is_read_only"] == "true")
        #expect(json["can_trim"] == "false")
        #expect(json["can_zero"] == "false")
        #expect(json["export-size"] == "1048576")
        let missing = try Self.nbdinfo!.run(["--size", "nbd+unix:///nope?socket=\(server.socketPath)"])
        #expect(missing.status != 0)
    }

    /// qemu-img writes an image into the export (its zero runs as WRITE_ZEROES), compares it,
    /// nbdcopy reads it back over several connections (CAN_MULTI_CONN), and writes it again.
    @Test(.enabled(if: qemuImg != nil && nbdcopy != nil, "qemu-img or nbdcopy is not installed (apt-get install qemu-utils libnbd-bin)"))
    func qemuImgAndNbdcopyRoundTrip() throws {
        let size = 16 << 20
        let server = try RunningServer(MemoryBackendOptions(size: size, slotSize: 64 << 10, slots: 64, delay: 1, shuffle: true))
        let dir = TemporaryDirectory()
        let source = dir.path + "/source.img", back = dir.path + "/back.img"
        // Data with holes: 1 MiB of data, 1 MiB of zeroes, alternating, and a few scattered blocks.
        var image = [UInt8](repeating: 0, count: size)
        for mb in stride(from: 0, to: 16, by: 2) {
            image.replaceSubrange((mb << 20)..<((mb + 1) << 20), with: pattern(1 << 20, seed: mb))
        }
        for k in 0..<8 { image.replaceSubrange(((2 * k + 1) << 20) + 4096 * k..<((2 * k + 1) << 20) + 4096 * (k + 1), with: pattern(4096, seed: 100 + k)) }
        try writeFile(source, image)
        server.disk.fill(0, [UInt8](repeating: 0xAA, count: size))  // so that zero runs must be written

        let convert = try Self.qemuImg!.run(["convert", "-n", "-f", "raw", "-O", "raw", "-W", source, Self.uri(server)])
        #expect(convert.status == 0, "\(convert.stderr)")
        #expect(server.disk.read(0, size) == image)
        let compare = try Self.qemuImg!.run(["compare", "-f", "raw", "-F", "raw", source, Self.uri(server)])
        #expect(compare.status == 0, "\(compare.stdout) \(compare.stderr)")

        let copy = try Self.nbdcopy!.run([Self.uri(server), back])
        #expect(copy.status == 0, "\(copy.stderr)")
        #expect(try readFile(back) == image)

        // And the other way: nbdcopy writes (several connections, flush at the end).
        server.disk.fill(0, [UInt8](repeating: 0x55, count: size))
        let up = try Self.nbdcopy!.run(["--flush", source, Self.uri(server)])
        #expect(up.status == 0, "\(up.stderr)")
        #expect(server.disk.read(0, size) == image)
        #expect(server.disk.readDurable(0, size) == image)  // --flush made it durable

        let stats = server.stop()
        #expect(server.disk.violations.isEmpty, "\(server.disk.violations)")
        #expect(server.disk.reservedNow == 0)
        #expect(stats.protocolViolations == 0 && stats.errorReplies == 0)
        #expect(stats.writeZeroes > 0)
        #expect(stats.connectionsAccepted > 4)  // nbdcopy used more than one connection
    }
}

/// An executable found on the usual paths.
struct Tool: Sendable {
    let path: String

    static func find(_ name: String) -> Tool? {
        for dir in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/sbin"] where access(dir + "/" + name, X_OK) == 0 {
            return Tool(path: dir + "/" + name)
        }
        return nil
    }

    struct Result { var status: Int32; var stdout: String; var stderr: String }

    /// Runs the tool (killed after 60 s by timeout(1) when available) and collects its output.
    func run(_ arguments: [String]) throws -> Result {
        let dir = TemporaryDirectory()
        let out = dir.path + "/stdout", err = dir.path + "/stderr"
        var argv = [path] + arguments
        if let timeout = Tool.find("timeout") { argv = [timeout.path, "60"] + argv }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        posix_spawn_file_actions_addopen(&actions, 2, err, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        let cArguments = argv.map { strdup($0) } + [nil]
        defer { cArguments.forEach { free($0) } }
        var pid = pid_t()
        let rc = posix_spawn(&pid, argv[0], &actions, nil, cArguments, environ)
        guard rc == 0 else { throw TestFailure("posix_spawn \(argv[0]): \(rc)") }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        let exit = status & 0x7f == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
        return Result(status: exit, stdout: String(decoding: try readFile(out), as: UTF8.self),
                      stderr: String(decoding: try readFile(err), as: UTF8.self))
    }
}

func readFile(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "rb") else { throw TestFailure("open \(path): \(errno)") }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress!, 1, $0.count, f) }
        if n == 0 { break }
        bytes += chunk[0..<n]
    }
    return bytes
}

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    guard let f = fopen(path, "wb") else { throw TestFailure("create \(path): \(errno)") }
    defer { fclose(f) }
    guard bytes.withUnsafeBytes({ fwrite($0.baseAddress!, 1, $0.count, f) }) == bytes.count else { throw TestFailure("write \(path)") }
}

/// The scalar fields of a JSON text, by key (first occurrence), as written: `"a"` for strings,
/// `12`, `true`. Enough for nbdinfo's output without a JSON library.
struct JSONFields {
    var fields: [String: String] = [:]
    init(_ text: String) {
        let chars = Array(text.utf8)
        var i = 0
        while i < chars.count {
            guard chars[i] == UInt8(ascii: "\"") else { i += 1; continue }
            var j = i + 1
            while j < chars.count && chars[j] != UInt8(ascii: "\"") { j += chars[j] == UInt8(ascii: "\\") ? 2 : 1 }
            let key = String(decoding: chars[(i + 1)..<min(j, chars.count)], as: UTF8.self)
            var k = j + 1
            while k < chars.count && (chars[k] == UInt8(ascii: " ") || chars[k] == UInt8(ascii: "\t")) { k += 1 }
            guard k < chars.count, chars[k] == UInt8(ascii: ":") else { i = j + 1; continue }
            k += 1
            while k < chars.count && (chars[k] == UInt8(ascii: " ") || chars[k] == UInt8(ascii: "\n")) { k += 1 }
            var end = k
            if k < chars.count && chars[k] == UInt8(ascii: "\"") {
                end = k + 1
                while end < chars.count && chars[end] != UInt8(ascii: "\"") { end += chars[end] == UInt8(ascii: "\\") ? 2 : 1 }
                end += 1
            } else {
                while end < chars.count && !",}]\n".utf8.contains(chars[end]) { end += 1 }
            }
            if fields[key] == nil && k < chars.count && chars[k] != UInt8(ascii: "{") && chars[k] != UInt8(ascii: "[") {
                fields[key] = String(decoding: chars[k..<min(end, chars.count)], as: UTF8.self).trimmingSpaces
            }
            i = k
        }
    }
    subscript(key: String) -> String? { fields[key] }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\n" || c == "\t" || c == "\r" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\t" || c == "\r" { s.removeLast() }
        return String(s)
    }
}
