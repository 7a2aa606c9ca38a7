#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import SystemPackage

/// Read-only access to sysfs-like trees. The only file I/O the PCI layer does.
/// Every function takes a full path so tests can point them at a fixture tree.
enum SysfsFiles {
    /// The whole content of a small attribute file (sysfs attributes are at most a page, config 4 KiB).
    static func readBytes(_ path: String, limit: Int = 65536) throws(PCIError) -> [UInt8] {
        let fd: FileDescriptor
        do { fd = try FileDescriptor.open(path, .readOnly, options: [.closeOnExec]) } catch {
            throw .unreadable(path: path, errno: (error as? Errno)?.rawValue ?? EIO)
        }
        defer { try? fd.close() }
        var result: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while result.count < limit {
            let n: Int
            do {
                n = try chunk.withUnsafeMutableBytes { try fd.read(into: $0, retryOnInterrupt: true) }
            } catch { throw .unreadable(path: path, errno: (error as? Errno)?.rawValue ?? EIO) }
            if n == 0 { break }
            result.append(contentsOf: chunk[0..<n])
        }
        return result
    }

    /// A text attribute without its trailing newline.
    static func readText(_ path: String) throws(PCIError) -> String {
        var bytes = try readBytes(path)
        while let last = bytes.last, last == 0x0A || last == 0x20 || last == 0 { bytes.removeLast() }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// A hex attribute such as `0x1af4`.
    static func readHex(_ path: String) throws(PCIError) -> UInt32 {
        let text = try readText(path)
        let digits = text.hasPrefix("0x") ? text.dropFirst(2) : Substring(text)
        guard let value = UInt32(digits, radix: 16) else {
            throw .unreadable(path: path, errno: EINVAL)
        }
        return value
    }

    /// The last path component of a symlink's target, or nil if `path` is not a symlink.
    static func linkBasename(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink(path, &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        let target = String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return target.split(separator: "/").last.map(String.init)
    }

    /// Names in a directory, sorted, without `.` and `..`; empty if it does not exist.
    static func list(_ path: String) -> [String] {
        guard let dir = opendir(path) else { return [] }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    static func exists(_ path: String) -> Bool {
        access(path, F_OK) == 0
    }
}
