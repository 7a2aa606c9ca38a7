import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import Syscalls
#if canImport(Glibc)
import Glibc
#endif

/// `--metrics ADDR:PORT`: an HTTP/1.1 endpoint (SwiftNIO) that answers `GET /metrics` with the
/// exposition and everything else with 404 or 405. One event-loop thread, which never takes the
/// stop signals (they go to the service loop). The socket is bound with SO_REUSEPORT, so during
/// a hot upgrade the new driver listens on the same port before the old one exits: a scrape
/// reaches one of the two and is answered.
public final class MetricsHTTPServer: Sendable {
    let group: MultiThreadedEventLoopGroup
    let channel: any Channel
    let closed = Atomic(false)
    /// The address and port bound (the port is useful with port 0).
    public let host: String
    public let port: Int

    public init(host: String, port: Int, exposition: MetricsExposition) throws {
        // Threads started here inherit this mask: SIGINT/SIGTERM/SIGUSR1 stay the service loop's.
        let group = Syscall.withSignalsBlocked([SIGINT, SIGTERM, SIGUSR1]) { MultiThreadedEventLoopGroup(numberOfThreads: 1) }
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.socketOption(NIOBSDSocket.Option(rawValue: SO_REUSEPORT)), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(MetricsRequestHandler(exposition: exposition))
                }
            }
        do {
            channel = try bootstrap.bind(host: host, port: port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw error
        }
        self.group = group
        self.host = host
        self.port = channel.localAddress?.port ?? port
    }

    /// Stops listening and ends the thread (once; later calls return at once).
    public func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }
}

/// One connection: each request answered, then the connection closed.
final class MetricsRequestHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let exposition: MetricsExposition

    init(exposition: MetricsExposition) { self.exposition = exposition }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let request) = unwrapInboundIn(data) else { return }
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        let status: HTTPResponseStatus, body: [UInt8], type: String
        if path != "/metrics" {
            (status, body, type) = (.notFound, Array("not found: the metrics are at /metrics\n".utf8), "text/plain; charset=utf-8")
        } else if request.method != .GET && request.method != .HEAD {
            (status, body, type) = (.methodNotAllowed, Array("only GET /metrics\n".utf8), "text/plain; charset=utf-8")
        } else {
            // Prometheus' text format, version 0.0.4.
            (status, body, type) = (.ok, exposition.render(), "text/plain; version=0.0.4; charset=utf-8")
        }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: type)
        headers.add(name: "Content-Length", value: "\(body.count)")
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: body)))), promise: nil)
        }
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in context.close(promise: nil) }
    }
}
