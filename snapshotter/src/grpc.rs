//! containerd's `Snapshots` gRPC service over a [`Store`], through the
//! `containerd-snapshots` crate's [`Snapshotter`] trait. The store's work is
//! blocking (file syncs, `mkfs`, `nbd-client`), so every call runs on tokio's
//! blocking pool.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Snapshotter, Usage};

use crate::error::SnapError;
use crate::store::Store;

/// The gRPC face of a [`Store`].
#[derive(Debug, Clone)]
pub struct Service {
    store: Arc<Store>,
}

impl Service {
    /// Serve `store`.
    pub fn new(store: Arc<Store>) -> Service {
        Service { store }
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<R, SnapError> + Send + 'static,
    ) -> Result<R, SnapError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| SnapError::FailedPrecondition(format!("internal error: the request's task failed: {e}")))?
    }
}

/// The stream of [`Snapshotter::list`].
pub type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info, SnapError>>>;

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for Service {
    type Error = SnapError;

    async fn stat(&self, key: String) -> Result<Info, SnapError> {
        self.blocking(move |s| s.stat(&key)).await
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, SnapError> {
        self.blocking(move |s| s.update(&info, &fieldpaths.unwrap_or_default())).await
    }

    async fn usage(&self, key: String) -> Result<Usage, SnapError> {
        self.blocking(move |s| s.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, SnapError> {
        self.blocking(move |s| s.mounts(&key)).await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapError> {
        self.blocking(move |s| s.prepare(&key, &parent, Store::labels_of(labels), false)).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapError> {
        self.blocking(move |s| s.prepare(&key, &parent, Store::labels_of(labels), true)).await
    }

    async fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<(), SnapError> {
        self.blocking(move |s| s.commit(&name, &key, Store::labels_of(labels))).await
    }

    async fn remove(&self, key: String) -> Result<(), SnapError> {
        self.blocking(move |s| s.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), SnapError> {
        let report = self.blocking(|s| s.cleanup()).await?;
        eprintln!(
            "thinpool-snapshotter: cleanup removed {} leftover device(s){}{}",
            report.removed.len(),
            if report.removed.is_empty() { "" } else { ": " },
            report.removed.join(", ")
        );
        if !report.forgotten.is_empty() {
            eprintln!(
                "thinpool-snapshotter: cleanup forgot {} attachment(s) no longer connected: {}",
                report.forgotten.len(),
                report.forgotten.join(", ")
            );
        }
        Ok(())
    }

    type InfoStream = InfoStream;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<InfoStream, SnapError> {
        let infos = self.blocking(move |s| s.list(&filters)).await?;
        Ok(tokio_stream::iter(infos.into_iter().map(Ok).collect::<Vec<_>>()))
    }
}
