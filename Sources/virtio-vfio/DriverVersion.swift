/// The driver's version, shown by `--version` and `info`.
enum DriverVersion {
    static let string = "0.1.0"
}
