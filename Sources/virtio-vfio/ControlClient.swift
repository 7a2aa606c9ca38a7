import HotUpgrade
import Upgrade
#if canImport(Glibc)
import Glibc
#endif

/// What the driver serving a control socket says about itself (nil: nobody answers).
func askServingDriver(_ path: String) -> (pid: Int32, version: String, features: UInt64, arguments: [String])? {
    guard let connection = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 2000) else { return nil }
    guard (try? connection.send(.describe)) != nil,
          case .described(let pid, let version, let features, let arguments)?? = try? connection.receiveMessage(timeoutMilliseconds: 2000)
    else { return nil }
    return (pid, version, features, arguments)
}

/// The counters of the driver serving a control socket (nil: nobody answers, or it keeps none).
func askServingDriverCounters(_ path: String) -> [HandoverMessage.Counter]? {
    guard let connection = try? ControlConnection(connectingTo: path, timeoutMilliseconds: 2000) else { return nil }
    guard (try? connection.send(.statistics)) != nil,
          case .counters(let counters)?? = try? connection.receiveMessage(timeoutMilliseconds: 2000)
    else { return nil }
    return counters
}

/// The answer to `describe`: this driver's pid, version, features and command line, or a
/// refusal if the command line cannot travel (then `upgrade` cannot repeat it; start the
/// successor with `--take-over` by hand).
func describeThisDriver(features: UInt64, arguments: [String]) -> HandoverMessage {
    if let problem = HandoverMessage.problem(describing: arguments) {
        return .refused("this driver's command line cannot be described (\(problem)); start the successor with --take-over yourself")
    }
    return .described(pid: getpid(), driverVersion: DriverVersion.string, features: features, arguments: arguments)
}
