import ArgumentParser
import Virtio

extension RingPreference: ExpressibleByArgument {}

/// `--ring auto|split|packed`: the virtqueue format to drive the device with (§2.6). `auto`
/// negotiates RING_PACKED when the device offers it; `packed` on a device that does not is refused
/// with exit 69 before DRIVER_OK.
struct RingOption: ParsableArguments {
    @Option(help: ArgumentHelp("Virtqueue format: auto (packed when the device offers RING_PACKED), split or packed.",
                               valueName: "format"))
    var ring: RingPreference = .auto
}
