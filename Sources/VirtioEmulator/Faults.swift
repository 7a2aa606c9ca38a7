import Virtio

extension EmulatedDevice {
    /// Faults a test can switch on, at any time (`device.faults = ...`); each takes effect on the
    /// device's next action of that kind. Model-level faults (queue sizes 0 or not a power of 2,
    /// blk capacity 0 or huge, seg_max 0) are `Model` values; `setNeedsReset()` is a method.
    public struct Faults: Sendable, Equatable {
        /// Status keeps reading back its old value this many times after a reset is written.
        public var resetLatencyReads = 0
        /// A reset never completes: status never reads back 0.
        public var resetNeverCompletes = false
        /// The device refuses FEATURES_OK whatever the driver accepted.
        public var refuseFeaturesOK = false
        /// `config_generation` changes on every read.
        public var unstableConfigGeneration = false
        /// The device clears FEATURES_OK from its status (seen on the next status read).
        public var clearFeaturesOK = false
        /// Completions carry a descriptor id that is not the head of any chain in flight.
        public var usedIDNotInFlight = false
        /// Every completion is reported twice (two used elements with the same id).
        public var duplicateCompletion = false
        /// The used length is one byte more than the chain's device-writable bytes.
        public var usedLengthPastBuffer = false
        /// Every completion reports a used length of 0 (nothing written; for virtio-rng a
        /// violation of §5.4.6.2, "one or more random bytes").
        public var usedLengthZero = false
        /// The used index advances by queue size + 1 for one completion.
        public var usedIndexJump = false
        /// The device stops consuming buffers (ignores notifications; nothing completes).
        public var stopCompleting = false
        /// A per-queue reset never completes (`queue_reset` keeps reading 1).
        public var queueResetNeverCompletes = false
        /// blk READ (a short read): the device writes all the data and status OK, but reports a
        /// used length of half the data + 1, shorter than data + status (§5.2.6).
        public var shortReadLength = false
        /// blk READ (a short read): the device writes only the first N bytes of the data (the rest
        /// of the driver's buffer keeps what it held), then status OK, and reports N + 1: a used
        /// length that is honest about the data it wrote, and short of data + status.
        public var shortReadDataBytes: Int?
        /// The faults above are transient: the device's next reset (the driver's recovery) ends
        /// them all, at the moment it completes, before the driver can submit again.
        public var endAtReset = false

        public init() {}
    }

    /// A driver action the spec forbids, as the device saw it.
    public struct Violation: Sendable, Equatable, CustomStringConvertible {
        public var rule: String
        public var description: String { rule }
    }

    /// What the device did on one queue since it was last enabled.
    public struct QueueStatistics: Sendable, Equatable {
        /// Available buffer notifications consumed from the doorbell.
        public var notifications = 0
        /// Descriptor chains taken from the available ring and completed.
        public var completed = 0
        /// Used buffer notifications sent (ISR bit set and the vector signalled, if any).
        public var interrupts = 0
        /// Passes that completed buffers but sent no notification (flags or used_event said so).
        public var suppressedInterrupts = 0
        /// With VIRTIO_F_NOTIFICATION_DATA: notifications that carried data, and the upper 16
        /// bits of the last one (next_off and next_wrap, §2.9).
        public var notificationsWithData = 0
        public var lastNotificationData: UInt16?

        public init() {}
    }
}
