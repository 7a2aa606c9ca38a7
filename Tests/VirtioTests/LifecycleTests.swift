import Testing
@testable import Virtio
import VirtioEmulator

@Suite("device lifecycle against the emulator (spec 3.1)")
struct LifecycleTests {
    func device(_ model: EmulatedDevice.Model = .rng) -> (EmulatedDevice, EmulatedTransport) {
        let d = EmulatedDevice(model: model)
        return (d, EmulatedTransport(device: d))
    }

    @Test func followsTheInitialisationOrder() throws {
        let (d, t) = device()
        try Lifecycle.reset(t)
        let n = try Lifecycle.negotiate(t, wanted: [.version1])
        #expect(n.transitions.map(\.wrote) == [[.acknowledge], [.acknowledge, .driver], [.acknowledge, .driver, .featuresOK]])
        #expect(n.transitions.map(\.readBack) == n.transitions.map(\.wrote))
        // ACCESS_PLATFORM is accepted whenever offered; nothing else was wanted.
        #expect(n.accepted == [.version1, .accessPlatform])
        #expect(d.driverFeatures == n.accepted)
        try Lifecycle.driverOK(t)
        #expect(t.readStatus() == [.acknowledge, .driver, .featuresOK, .driverOK])
        #expect(d.violations.isEmpty)
    }

    @Test func resetWaitsUntilStatusReadsZero() throws {
        let (d, t) = device()
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: [])
        var faults = EmulatedDevice.Faults()
        faults.resetLatencyReads = 200
        d.faults = faults
        try Lifecycle.reset(t)
        #expect(t.readStatus().rawValue == 0)
        #expect(d.driverFeatures == [])
        // Negotiating right after a reset that really completed breaks no rule.
        _ = try Lifecycle.negotiate(t, wanted: [])
        #expect(d.violations.isEmpty)
    }

    @Test func resetThatNeverCompletesTimesOut() throws {
        let (d, t) = device()
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: [])
        var faults = EmulatedDevice.Faults()
        faults.resetNeverCompletes = true
        d.faults = faults
        #expect { try Lifecycle.reset(t, timeout: .milliseconds(20)) } throws: { error in
            guard case .resetTimeout(let last, let waited, let afterFunctionReset)? = error as? VirtioError else { return false }
            return last == DeviceStatus([.acknowledge, .driver, .featuresOK]).rawValue && waited >= 20_000 && !afterFunctionReset
        }
        #expect(d.functionResetCount == 0)
        #expect("\(VirtioError.resetTimeout(lastStatus: 1, waitedMicroseconds: 5, afterFunctionReset: false))"
            .contains("the function has no reset below virtio"))
    }

    /// A status reset that never completes on a function with a reset below virtio (a PCIe FLR):
    /// the function is reset, status reads 0, and the device negotiates and runs again.
    @Test func aResetThatNeverCompletesIsFinishedByAFunctionReset() throws {
        var model = EmulatedDevice.Model.rng
        model.functionLevelReset = true
        let (d, t) = device(model)
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: [])
        try Lifecycle.driverOK(t)
        var faults = EmulatedDevice.Faults()
        faults.resetNeverCompletes = true
        d.faults = faults
        let outcome = try Lifecycle.resetDevice(t, timeout: .milliseconds(20))
        #expect(outcome.byFunctionReset && outcome.microseconds >= 20_000)
        #expect(t.readStatus().rawValue == 0 && d.functionResetCount == 1)
        _ = try Lifecycle.negotiate(t, wanted: [])
        try Lifecycle.driverOK(t)
        #expect(t.readStatus() == [.acknowledge, .driver, .featuresOK, .driverOK])
        #expect(d.violations.isEmpty)
        // A status reset that completes does not touch the function.
        #expect(try !Lifecycle.resetDevice(t).byFunctionReset)
        #expect(d.functionResetCount == 1)
    }

    @Test func refusesALegacyOnlyDeviceAndMarksItFailed() throws {
        let (_, t) = device(.init(type: .entropy, offeredFeatures: [.ringEventIdx], queueMaxSizes: [8]))
        try Lifecycle.reset(t)
        #expect(throws: VirtioError.legacyOnly(offered: Features.ringEventIdx.rawValue)) {
            try Lifecycle.negotiate(t, wanted: [.ringEventIdx])
        }
        #expect(t.readStatus().contains(.failed))
        // Reset is the way back.
        try Lifecycle.reset(t)
        #expect(t.readStatus().rawValue == 0)
    }

    @Test func reportsFeaturesTheDeviceRefused() throws {
        let (d, t) = device()
        var faults = EmulatedDevice.Faults()
        faults.refuseFeaturesOK = true
        d.faults = faults
        try Lifecycle.reset(t)
        #expect { try Lifecycle.negotiate(t, wanted: []) } throws: { error in
            guard case .featuresRejected(_, let accepted, let status)? = error as? VirtioError else { return false }
            return accepted == Features([.version1, .accessPlatform]).rawValue && status & DeviceStatus.featuresOK.rawValue == 0
        }
        #expect(t.readStatus().contains(.failed))
        d.faults = .init()
        try Lifecycle.reset(t)
        _ = try Lifecycle.negotiate(t, wanted: [])
        #expect(d.violations.isEmpty)
    }

    @Test func acceptsOnlyWhatIsBothWantedAndOffered() throws {
        let (_, t) = device()
        try Lifecycle.reset(t)
        let n = try Lifecycle.negotiate(t, wanted: [.ringEventIdx, .inOrder, .notificationData])
        #expect(n.accepted == [.version1, .accessPlatform, .ringEventIdx])
    }

    @Test func renegotiatesADifferentSetOnEveryCycle() throws {
        let (d, t) = device()
        for cycle in 0..<1000 {
            try Lifecycle.reset(t)
            let wanted: Features = cycle % 2 == 0 ? [.ringEventIdx, .ringIndirectDesc] : []
            let n = try Lifecycle.negotiate(t, wanted: wanted)
            #expect(d.driverFeatures == n.accepted)
            #expect(n.accepted.contains(.ringEventIdx) == (cycle % 2 == 0))
        }
        // Features were only ever dropped through a reset: the emulator saw no out-of-order write.
        #expect(d.violations.isEmpty)
        #expect(d.resetCount == 1000)
    }

    @Test func configReadRetriesWhileTheGenerationChanges() throws {
        let (d, t) = device()
        var reads = 0
        let value = try Lifecycle.readConfig(t) { reads += 1; return 42 }
        #expect(value == 42 && reads == 1)
        var faults = EmulatedDevice.Faults()
        faults.unstableConfigGeneration = true
        d.faults = faults
        #expect(throws: VirtioError.self) { try Lifecycle.readConfig(t, attempts: 5) { 0 } }
    }
}

@Suite("emulator refuses drivers that break the spec")
struct EmulatorStrictnessTests {
    func fresh() -> (EmulatedDevice, EmulatedTransport) {
        let d = EmulatedDevice(model: .rng)
        return (d, EmulatedTransport(device: d))
    }

    @Test func driverOKBeforeFeaturesOK() {
        let (d, t) = fresh()
        t.writeStatus([.acknowledge])
        t.writeStatus([.acknowledge, .driver])
        t.writeStatus([.acknowledge, .driver, .driverOK])
        #expect(d.violations.map(\.rule) == ["DRIVER_OK set before FEATURES_OK (§3.1.1)"])
        #expect(t.readStatus() == [.acknowledge, .driver])
    }

    @Test func featuresOutsideThoseOfferedDoNotGetFeaturesOK() {
        let (_, t) = fresh()
        t.writeStatus([.acknowledge])
        t.writeStatus([.acknowledge, .driver])
        t.writeDriverFeatures([.version1, .inOrder])  // IN_ORDER is not offered by this model
        t.writeStatus([.acknowledge, .driver, .featuresOK])
        #expect(!t.readStatus().contains(.featuresOK))
    }

    @Test func featuresAfterFeaturesOKAreRefused() {
        let (d, t) = fresh()
        t.writeStatus([.acknowledge])
        t.writeStatus([.acknowledge, .driver])
        t.writeDriverFeatures([.version1])
        t.writeStatus([.acknowledge, .driver, .featuresOK])
        t.writeDriverFeatures([.version1, .ringEventIdx])
        #expect(d.driverFeatures == [.version1])
        #expect(d.violations.count == 1)
    }

    @Test func writesAfterFailedAreRefusedUntilReset() {
        let (d, t) = fresh()
        t.writeStatus([.acknowledge, .failed])
        t.writeStatus([.acknowledge, .driver, .failed])
        #expect(d.violations.count == 1)
        t.writeStatus([])
        #expect(t.readStatus().rawValue == 0)
        t.writeStatus([.acknowledge])
        #expect(t.readStatus() == [.acknowledge])
    }

    @Test func clearingAStatusBitIsRefused() {
        let (d, t) = fresh()
        t.writeStatus([.acknowledge])
        t.writeStatus([.acknowledge, .driver])
        t.writeStatus([.driver])
        #expect(d.violations.map(\.rule) == ["status DRIVER clears bits of ACKNOWLEDGE|DRIVER (§2.1.1)"])
        #expect(t.readStatus() == [.acknowledge, .driver])
    }
}
