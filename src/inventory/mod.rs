//! The GPU inventory: which GPUs there are and how their memory is used,
//! behind one small trait with two implementations — NVML, and a static
//! list from the configuration for machines without an NVIDIA driver.
//!
//! Readings are blocking calls (NVML is FFI): the broker makes them on a
//! blocking thread and never while it holds the core's lock. Only this
//! module knows NVML types; the core gets `GpuSpec` and `MemoryReading`.

mod nvml;
mod procfs;

use std::sync::Arc;

use tracing::warn;

use crate::config::{GpuConfig, InventorySource};
use crate::core::{GpuSpec, MemoryReading};

pub(crate) use nvml::NvmlInventory;

/// Where GPUs and their memory are learned.
pub(crate) trait Inventory: Send + Sync + 'static {
    /// `"nvml"` or `"static"`, as Status shows it.
    fn source(&self) -> &'static str;

    /// The GPUs, as found at start.
    fn gpus(&self) -> Vec<GpuSpec>;

    /// Reads a GPU's memory now; `None` when this inventory cannot measure.
    /// Blocking.
    fn read(&self, index: u32) -> Result<Option<MemoryReading>, InventoryError>;
}

/// Why the inventory could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InventoryError {
    /// NVML failed.
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
}

/// GPUs from the configuration: sizes known, usage modelled by the core.
#[derive(Debug)]
pub(crate) struct StaticInventory {
    gpus: Vec<GpuSpec>,
}

impl StaticInventory {
    /// One GPU per entry of `memory_mib`; one of unknown size when empty.
    pub(crate) fn new(memory_mib: &[u64]) -> Self {
        let sizes = if memory_mib.is_empty() {
            &[0][..]
        } else {
            memory_mib
        };
        let gpus = sizes
            .iter()
            .zip(0u32..)
            .map(|(total_mib, index)| GpuSpec {
                index,
                uuid: String::new(),
                name: String::new(),
                total_mib: *total_mib,
                measured: false,
            })
            .collect();
        Self { gpus }
    }
}

impl Inventory for StaticInventory {
    fn source(&self) -> &'static str {
        "static"
    }

    fn gpus(&self) -> Vec<GpuSpec> {
        self.gpus.clone()
    }

    fn read(&self, _index: u32) -> Result<Option<MemoryReading>, InventoryError> {
        Ok(None)
    }
}

/// Opens the inventory that `config` asks for. With `auto`, NVML is tried
/// first and a failure falls back to the static inventory with one warning.
pub(crate) fn open(config: &GpuConfig) -> Result<Arc<dyn Inventory>, InventoryError> {
    let static_inventory = || Arc::new(StaticInventory::new(&config.static_memory_mib));
    match config.source {
        InventorySource::Static => Ok(static_inventory()),
        InventorySource::Nvml => Ok(Arc::new(NvmlInventory::open(
            config.nvml_library.as_deref(),
        )?)),
        InventorySource::Auto => match NvmlInventory::open(config.nvml_library.as_deref()) {
            Ok(nvml) => Ok(Arc::new(nvml)),
            Err(e) => {
                warn!(
                    error = %e,
                    "NVML is not available; using the static GPU inventory from [gpu] static_memory_mib"
                );
                Ok(static_inventory())
            }
        },
    }
}
