import Testing
import CVirtioShim

/// The VFIO ABI is fixed: these numbers are what the kernel decodes. A change here means the shim
/// compiled against a different header, and every ioctl would go astray.
@Suite("VFIO ioctl request numbers and struct layouts (linux/vfio.h)")
struct IoctlNumberTests {
    // _IO(';', 100 + n): type 0x3b, no size or direction bits.
    @Test(arguments: [
        ("VFIO_GET_API_VERSION", CVirtioShim_VFIO_GET_API_VERSION, UInt(0x3B64)),
        ("VFIO_CHECK_EXTENSION", CVirtioShim_VFIO_CHECK_EXTENSION, 0x3B65),
        ("VFIO_SET_IOMMU", CVirtioShim_VFIO_SET_IOMMU, 0x3B66),
        ("VFIO_GROUP_GET_STATUS", CVirtioShim_VFIO_GROUP_GET_STATUS, 0x3B67),
        ("VFIO_GROUP_SET_CONTAINER", CVirtioShim_VFIO_GROUP_SET_CONTAINER, 0x3B68),
        ("VFIO_GROUP_UNSET_CONTAINER", CVirtioShim_VFIO_GROUP_UNSET_CONTAINER, 0x3B69),
        ("VFIO_GROUP_GET_DEVICE_FD", CVirtioShim_VFIO_GROUP_GET_DEVICE_FD, 0x3B6A),
        ("VFIO_DEVICE_GET_INFO", CVirtioShim_VFIO_DEVICE_GET_INFO, 0x3B6B),
        ("VFIO_DEVICE_GET_REGION_INFO", CVirtioShim_VFIO_DEVICE_GET_REGION_INFO, 0x3B6C),
        ("VFIO_DEVICE_GET_IRQ_INFO", CVirtioShim_VFIO_DEVICE_GET_IRQ_INFO, 0x3B6D),
        ("VFIO_DEVICE_SET_IRQS", CVirtioShim_VFIO_DEVICE_SET_IRQS, 0x3B6E),
        ("VFIO_DEVICE_RESET", CVirtioShim_VFIO_DEVICE_RESET, 0x3B6F),
        ("VFIO_IOMMU_GET_INFO", CVirtioShim_VFIO_IOMMU_GET_INFO, 0x3B70),
        ("VFIO_IOMMU_MAP_DMA", CVirtioShim_VFIO_IOMMU_MAP_DMA, 0x3B71),
        ("VFIO_IOMMU_UNMAP_DMA", CVirtioShim_VFIO_IOMMU_UNMAP_DMA, 0x3B72),
    ])
    func requestNumber(_ name: String, _ actual: UInt, _ expected: UInt) {
        #expect(actual == expected, "\(name)")
    }

    @Test func constants() {
        #expect(VFIO_API_VERSION == 0)
        #expect(VFIO_TYPE1v2_IOMMU == 3)
        #expect(VFIO_NOIOMMU_IOMMU == 8)
        #expect(VFIO_GROUP_FLAGS_VIABLE == 1)
        #expect(VFIO_DEVICE_FLAGS_RESET == 1 && VFIO_DEVICE_FLAGS_PCI == 2)
        #expect(VFIO_REGION_INFO_FLAG_MMAP == 4)
        #expect(VFIO_DMA_MAP_FLAG_READ == 1 && VFIO_DMA_MAP_FLAG_WRITE == 2)
        #expect(VFIO_IRQ_SET_DATA_EVENTFD == 4 && VFIO_IRQ_SET_ACTION_TRIGGER == 32)
    }

    @Test func structLayouts() {
        #expect(MemoryLayout<vfio_group_status>.size == 8)
        #expect(MemoryLayout<vfio_device_info>.size == 20)
        #expect(MemoryLayout<vfio_region_info>.size == 32)
        #expect(MemoryLayout<vfio_irq_info>.size == 16)
        #expect(MemoryLayout<vfio_iommu_type1_info>.size == 24)
        #expect(MemoryLayout<vfio_iommu_type1_dma_map>.size == 32)
        #expect(MemoryLayout<vfio_iommu_type1_dma_unmap>.size == 24)
        #expect(MemoryLayout<vfio_region_info>.offset(of: \vfio_region_info.offset) == 24)
        #expect(MemoryLayout<vfio_iommu_type1_dma_map>.offset(of: \vfio_iommu_type1_dma_map.iova) == 16)
    }
}
