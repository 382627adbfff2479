//! Thin devices as NBD exports: the glue between [`crate::nbd`] and a shared pool.
//!
//! An opened [`DeviceExport`] is the attachment: opening counts the device as
//! attached and dropping the export (the last clone of it) releases the count, so
//! the count is right on every exit path of a connection, whatever the NBD layer
//! does or fails to do.

use std::sync::{Arc, RwLock};

use crate::error::PoolError;
use crate::nbd::{Catalog, ContextExtent, Export, ExportError, Extent};
use crate::server::service::Service;
use crate::thin::DevId;

/// One exported thin device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedDevice {
    /// Export name.
    pub name: String,
    /// Thin device id.
    pub id: DevId,
    /// Virtual size in bytes.
    pub size: u64,
}

/// Map pool errors to NBD export errors.
fn export_err(e: PoolError) -> ExportError {
    match e {
        e if e.is_no_space() => ExportError::NoSpace,
        PoolError::ReadOnly => ExportError::ReadOnly,
        PoolError::DataIo(io) => ExportError::Io(io),
        PoolError::Invalid(s) => ExportError::Invalid(s),
        other => ExportError::Other(other.to_string()),
    }
}

/// A thin device served over NBD, counted as attached while it lives.
#[derive(Debug)]
pub struct DeviceExport {
    service: Arc<Service>,
    id: DevId,
    size: u64,
    read_only: bool,
    block_bytes: u32,
}

impl Drop for DeviceExport {
    fn drop(&mut self) {
        self.service.detach(self.id);
    }
}

impl Export for DeviceExport {
    fn size(&self) -> u64 {
        self.size
    }
    fn preferred_block_size(&self) -> u32 {
        self.block_bytes
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.service.read(self.id, offset, buf).map_err(export_err)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.service.write(self.id, offset, data).map_err(export_err)
    }
    fn flush(&self) -> Result<(), ExportError> {
        self.service.flush().map_err(export_err)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        self.service.discard(self.id, offset, len).map(|_| ()).map_err(export_err)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fast: bool) -> Result<(), ExportError> {
        if self.read_only {
            return Err(ExportError::ReadOnly);
        }
        if fast && !may_unmap {
            // Real zeros must be written: no faster than a write.
            return Err(ExportError::NotSupported);
        }
        self.service.write_zeroes(self.id, offset, len, may_unmap).map_err(export_err)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let runs = self.service.extents(self.id, offset, len).map_err(export_err)?;
        Ok(runs.into_iter().map(|r| Extent { length: r.len, hole: !r.mapped, zero: !r.mapped }).collect())
    }
    fn context_extents(&self, key: u64, offset: u64, len: u64) -> Result<Vec<ContextExtent>, ExportError> {
        let base = DevId::try_from(key).map_err(|_| ExportError::Invalid(format!("no device {key}")))?;
        crate::server::changed::extents(&self.service, self.id, base, offset, len).map_err(export_err)
    }
}

/// The exports of a served pool. The device list can change while serving
/// (devices created or deleted through the control socket).
pub struct PoolCatalog {
    service: Arc<Service>,
    devices: RwLock<Vec<ExportedDevice>>,
    default: RwLock<Option<String>>,
    read_only: bool,
}

impl std::fmt::Debug for PoolCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCatalog").finish_non_exhaustive()
    }
}

impl PoolCatalog {
    /// Export `devices`; `default` (a name) is also the export with the empty name.
    pub fn new(
        service: Arc<Service>,
        devices: Vec<ExportedDevice>,
        default: Option<String>,
        read_only: bool,
    ) -> Arc<PoolCatalog> {
        Arc::new(PoolCatalog { service, devices: RwLock::new(devices), default: RwLock::new(default), read_only })
    }

    /// Replace the exported devices (after a management change).
    pub fn set_devices(&self, devices: Vec<ExportedDevice>, default: Option<String>) {
        if let Ok(mut d) = self.devices.write() {
            *d = devices;
        }
        if let Ok(mut d) = self.default.write() {
            *d = default;
        }
    }

    /// The exported devices.
    pub fn devices(&self) -> Vec<ExportedDevice> {
        self.devices.read().map(|d| d.clone()).unwrap_or_default()
    }

    fn find(&self, name: &str) -> Option<ExportedDevice> {
        let name = if name.is_empty() { self.default.read().ok()?.clone()? } else { name.to_string() };
        self.devices.read().ok()?.iter().find(|d| d.name == name).cloned()
    }
}

impl Catalog for PoolCatalog {
    fn list(&self) -> Vec<(String, String)> {
        self.devices()
            .into_iter()
            .map(|d| {
                let desc = format!("thin device {} ({} bytes)", d.id, d.size);
                (d.name, desc)
            })
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let d = self.find(name)?;
        self.service.attach(d.id);
        let block_bytes = self.service.with_pool(|p| p.block_bytes()) as u32;
        Some(Arc::new(DeviceExport {
            service: Arc::clone(&self.service),
            id: d.id,
            size: d.size,
            read_only: self.read_only,
            block_bytes,
        }))
    }

    /// Nothing to do: the export's `Drop` releases the attach count (by device id,
    /// so a name that changed meanwhile cannot release the wrong device).
    fn close(&self, _name: &str) {}

    /// `thinpool:changed:<device>` for every other exported device (see
    /// [`crate::server::changed`]).
    fn meta_contexts(&self, export: &str, query: &str) -> Vec<(String, u64)> {
        match self.find(export) {
            Some(d) => crate::server::changed::contexts(&self.devices(), &d, query),
            None => Vec::new(),
        }
    }
}
