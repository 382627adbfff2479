//! Local block devices of a served pool: a thin device attached as a kernel block
//! device on this host (ublk: `/dev/ublkbN`), asked for through the control socket
//! (`attach`, `detach`) or at start (`thinctl serve --ublk NAME`).
//!
//! The library only defines what the control socket needs ([`LocalDevices`], served
//! by [`Controller`](crate::server::control::Controller) when the server has one) and
//! the typed description of an attachment ([`LocalDevice`]). The ublk server itself
//! lives in the `thinctl` binary (`src/bin/thinctl/ublk.rs`), on top of the `libublk`
//! crate: it opens the device through the same exports layer as NBD
//! ([`Catalog::open`](crate::nbd::export::Catalog::open) of [`PoolCatalog`](crate::server::exports::PoolCatalog)), so reads,
//! writes, discards, write-zeroes and flushes go through the same
//! [`Service`](crate::server::service::Service) calls, the same group commit and the
//! same attach count.

use serde::{Deserialize, Serialize};

use crate::server::protocol::ControlError;

/// One thin device attached as a local block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDevice {
    /// The thin device's name.
    pub name: String,
    /// The kind of attachment: `ublk`.
    pub kind: String,
    /// The block device, e.g. `/dev/ublkb0`.
    pub path: String,
    /// The kernel's device number (the N of `/dev/ublkbN`).
    pub dev_id: u32,
    /// Writes are refused (the kernel sees a read-only disk).
    pub read_only: bool,
}

/// What a server that attaches local devices offers the control socket.
pub trait LocalDevices: Send + Sync {
    /// Attach device `name` (read-only when `read_only`) and return where it is.
    fn attach(&self, name: &str, read_only: bool) -> Result<LocalDevice, ControlError>;
    /// Remove the local device of `name`; returns what was removed.
    fn detach(&self, name: &str) -> Result<LocalDevice, ControlError>;
    /// The devices attached now, ordered by name.
    fn list(&self) -> Vec<LocalDevice>;
}
