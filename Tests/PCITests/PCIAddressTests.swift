import Testing
@testable import PCI

@Suite("PCI addresses")
struct PCIAddressTests {
    @Test(arguments: [("0000:00:05.0", "0000:00:05.0"), ("00:05.0", "0000:00:05.0"), ("1:1f:1f.7", "0001:1f:1f.7"),
                      ("abcd:ff:00.3", "abcd:ff:00.3"), ("0000:3B:00.1", "0000:3b:00.1")])
    func parses(_ text: String, _ canonical: String) throws {
        #expect(try PCIAddress(parsing: text).description == canonical)
    }

    @Test(arguments: ["", "05.0", "0000:00:05", "0000:00:05.8", "0000:00:20.0", "0000:100:00.0", "00000:00:00.0",
                      "zz:00.0", "00:05.0 ", "0000:00:05.0.1", ":00:05.0", "-1:00.0"])
    func rejects(_ text: String) {
        #expect(throws: PCIError.self) { try PCIAddress(parsing: text) }
    }

    @Test func ordersByDomainBusDeviceFunction() throws {
        let a = try PCIAddress(parsing: "0000:00:05.1"), b = try PCIAddress(parsing: "0000:01:00.0")
        #expect(a < b)
    }
}
