//! The difference between two thin devices, at the pool level (see
//! [`crate::thin::DeltaRun`] for what the runs mean and what the walk costs).

use super::Pool;
use crate::error::PoolError;
use crate::thin::{DeltaRun, DevId, DiffOptions, HeldMappings};

impl Pool {
    /// The runs of virtual blocks where devices `left` and `right` differ (no
    /// `Same` runs), ascending; see [`crate::thin::Metadata::diff`].
    pub fn diff(&mut self, left: DevId, right: DevId) -> Result<Vec<DeltaRun>, PoolError> {
        self.md.diff(left, right)
    }

    /// [`Pool::diff`] with options: `Same` runs, a range of virtual blocks.
    pub fn diff_with(&mut self, left: DevId, right: DevId, opts: &DiffOptions) -> Result<Vec<DeltaRun>, PoolError> {
        self.md.diff_with(left, right, opts)
    }

    /// Commit, then hold every device's mappings as they are (see
    /// [`HeldMappings`]): a diff of held trees can be walked in steps while the
    /// devices change.
    pub fn hold_mappings(&mut self) -> Result<HeldMappings, PoolError> {
        self.commit()?;
        self.md.hold_mappings()
    }

    /// Let go of held mappings (see [`crate::thin::Metadata::release_held_mappings`]).
    pub fn release_held_mappings(&mut self, held: &HeldMappings) -> Result<(), PoolError> {
        self.md.release_held_mappings(held)
    }

    /// Make device `dev`'s contents those of device `snapshot` in O(1) (see
    /// [`crate::thin::Metadata::rollback`]); blocks only `dev` held are freed at
    /// the next commit.
    pub fn rollback(&mut self, dev: DevId, snapshot: DevId) -> Result<(), PoolError> {
        self.make_metadata_room()?;
        self.md.rollback(dev.into(), snapshot.into())?;
        self.discarded.forget_device(dev);
        Ok(())
    }
}
