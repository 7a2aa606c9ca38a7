import ArgumentParser
import PCI

/// A `BDF` argument, parsed and validated before anything is opened.
struct DeviceArgument: ParsableArguments {
    @Argument(help: ArgumentHelp("PCI address of the device, e.g. 0000:00:05.0 or 00:05.0.", valueName: "BDF"))
    var bdf: String

    func address() throws -> PCIAddress {
        do { return try PCIAddress(parsing: bdf) } catch { throw Failure.exit(error) }
    }
}
