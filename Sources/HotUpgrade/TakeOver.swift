import Logging
import Upgrade
import Virtio

/// The successor's whole path, for any service: connect and receive the device part, `attach`
/// the device (map it; nothing is written), `prepared` (the old driver quiesces and sends the
/// service part), `adopt` (live or reset, the service's clients), the test faults, the first
/// request, `ready`/`go`. Every failure after the connection declines with whether the device
/// was touched, so the old driver resumes (resetting first if it was).
///
/// `attach` maps the device from the received device descriptors (`successor.descriptors`).
/// `adopt` builds the service on the transport: it brings the device up with
/// `successor.bringUp` (live or reset), takes the service's descriptors, marks its phases, and
/// declines by throwing `successor.decline(...)`.
public func takeOver<T: HandoverTransport & ~Copyable, S: UpgradableService & ~Copyable>(
    path: String, address: String, type: DeviceType, options: TakeOverOptions, logger: Logger,
    attach: (inout Successor) throws(UpgradeError) -> T,
    adopt: (consuming T, inout Successor) throws(UpgradeError) -> S
) throws(UpgradeError) -> S {
    var successor = try Successor(path: path, address: address, type: type, requiredDeviceRoles: T.requiredDeviceRoles,
                                  options: options, logger: logger)
    let transport: T
    do { transport = try attach(&successor) } catch { throw successor.decline(error.message, touched: false) }
    try successor.prepared()
    var service = try adopt(transport, &successor)
    do throws(UpgradeError) {
        options.afterDeviceUp?()
        let report: ProbeReport
        do { report = try service.probe() } catch { throw successor.decline("first request failed: \(error)", touched: true) }
        successor.mark("first request")
        if options.failFirstRequest {
            throw successor.decline("first request failed (--debug-fault first-request-fails)", touched: true)
        }
        let mode = successor.live == true ? "live" : "reset"
        try successor.confirm("\(mode) mode, driver \(options.driverVersion), \(report.summary)")
        let gap = successor.gapNanoseconds
        logger.notice("\(address): took over\(report.object) from driver \(successor.record.driverVersion) in \(mode) mode\(report.detail) in \(successor.elapsed); service gap \(gap.map(milliseconds) ?? "unknown") (\(successor.phaseSummary), confirm)")
        options.tookOver?(successor.live == true, gap)
    } catch {
        // The device and the clients stay the old driver's: let go without touching them (no
        // reply, no socket file removed).
        service.relinquish()
        throw error
    }
    return service
}
