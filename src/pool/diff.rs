//! The difference between two thin devices, at the pool level (see
//! [`crate::thin::DeltaRun`] for what the runs mean and what the walk costs).

use super::Pool;
use crate::error::PoolError;
use crate::thin::{DeltaRun, DevId, DiffOptions};

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
}
