//! The NVML inventory, through `nvml-wrapper`. NVML is initialised once;
//! every reading asks it afresh.

use std::ffi::OsStr;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;

use super::{Inventory, InventoryError, procfs};
use crate::core::{GpuSpec, MemoryReading, ProcessUsage};

const MIB: u64 = 1024 * 1024;

/// GPUs as NVML reports them.
pub(crate) struct NvmlInventory {
    nvml: Nvml,
    gpus: Vec<GpuSpec>,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlInventory")
            .field("gpus", &self.gpus)
            .finish()
    }
}

impl NvmlInventory {
    /// Loads NVML (from `library` if given) and lists the GPUs.
    pub(crate) fn open(library: Option<&Path>) -> Result<Self, InventoryError> {
        let nvml = match library {
            Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init()?,
            None => Nvml::init()?,
        };
        let count = nvml.device_count()?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = nvml.device_by_index(index)?;
            gpus.push(GpuSpec {
                index,
                uuid: device.uuid()?,
                name: device.name()?,
                total_mib: device.memory_info()?.total / MIB,
                measured: true,
            });
        }
        Ok(Self { nvml, gpus })
    }
}

impl Inventory for NvmlInventory {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }

    fn read(&self, index: u32) -> Result<Option<MemoryReading>, InventoryError> {
        let device = self.nvml.device_by_index(index)?;
        // The memory and the processes are separate calls, and processes
        // allocate and free between them: memory allocated after the first
        // call would show both as free and as a process's own. Reading the
        // memory on both sides of the process list and keeping the smaller
        // free memory counts it as used; the core, in turn, never counts as
        // free what the list shows held (`MemoryReading::trusted_free_mib`).
        let before = device.memory_info()?;
        let processes = device
            .running_compute_processes()?
            .into_iter()
            .map(|process| ProcessUsage {
                pid: process.pid,
                used_mib: match process.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => bytes / MIB,
                    UsedGpuMemory::Unavailable => 0,
                },
                ancestors: procfs::ancestors(process.pid),
            })
            .collect();
        let after = device.memory_info()?;
        Ok(Some(MemoryReading {
            total_mib: before.total / MIB,
            used_mib: before.used.max(after.used) / MIB,
            free_mib: before.free.min(after.free) / MIB,
            processes,
        }))
    }
}
