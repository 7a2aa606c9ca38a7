import Glibc

/// What a leak would change: open descriptors, mappings, threads of this process.
struct ProcessResources: Equatable, CustomStringConvertible {
    var descriptors: Int
    var mappings: Int
    var threads: Int

    static func now() -> ProcessResources {
        ProcessResources(descriptors: entries("/proc/self/fd"), mappings: lines("/proc/self/maps"),
                         threads: entries("/proc/self/task"))
    }

    static func entries(_ path: String) -> Int {
        guard let dir = opendir(path) else { return -1 }
        defer { closedir(dir) }
        var n = 0
        while let e = readdir(dir) {
            let name = withUnsafePointer(to: e.pointee.d_name) { $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) } }
            if name != "." && name != ".." { n += 1 }
        }
        return n
    }

    static func lines(_ path: String) -> Int {
        guard let f = fopen(path, "r") else { return -1 }
        defer { fclose(f) }
        var n = 0
        while true { let c = fgetc(f); if c == EOF { break }; if c == 10 { n += 1 } }
        return n
    }

    var description: String { "\(descriptors) fds, \(mappings) mappings, \(threads) threads" }
}
