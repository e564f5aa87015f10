//! [`TierAdmin`], the operator's view of the tier: fleet-wide removals, and waiting for the
//! uploads that run in the background (see `uploads`).

use super::engine::Inner;
use super::handle::ImageCache;
use crate::error::{Error, ErrorKind, Result};
#[cfg(feature = "s3")]
use crate::key::Resolved;

/// The operator's view of the tier (object storage a fleet of hosts shares), from
/// [`ImageCache::tier`]: fleet-wide removals and waiting for uploads. A borrow, free to make.
/// Without the `s3` feature or a configured tier, its removals fail with
/// [`ErrorKind::Config`](crate::ErrorKind::Config) and [`flush`](Self::flush) returns at once.
#[derive(Clone, Copy)]
pub struct TierAdmin<'a> {
    cache: &'a ImageCache,
}

impl std::fmt::Debug for TierAdmin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TierAdmin").field(self.cache).finish()
    }
}

impl ImageCache {
    /// The tier's view: fleet-wide invalidation and clearing, and waiting for uploads (see
    /// [`TierAdmin`]).
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// // The origin corrected the file: no host may get the old bytes from the tier.
    /// cache.tier().invalidate("ct/0042.nii.gz").await?;
    /// # Ok(()) }
    /// ```
    pub fn tier(&self) -> TierAdmin<'_> {
        TierAdmin { cache: self }
    }
}

impl TierAdmin<'_> {
    /// [`ImageCache::invalidate`], and the tier's record of `url` too, so that
    /// no host gets it from the tier again: the next host to miss downloads it from the
    /// origin for the fleet. Hosts that have it keep their local copies until they expire or
    /// are invalidated there; its blob stays (other URLs may share it). Needs the `s3`
    /// feature and a tier ([`CacheBuilder::tier`](crate::CacheBuilder::tier)): without either, it
    /// fails with [`ErrorKind::Config`](crate::ErrorKind::Config).
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// // The origin corrected the file: no host may get the old bytes from the tier.
    /// let had_it = cache.tier().invalidate("ct/0042.nii.gz").await?;
    /// println!("local copy removed: {had_it}; the next host to miss downloads it");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::InvalidUrl`](crate::ErrorKind::InvalidUrl); [`ErrorKind::Config`](crate::ErrorKind::Config) when no tier is configured;
    /// [`ErrorKind::Network`](crate::ErrorKind::Network) when the tier cannot be reached (the local entry is removed
    /// first).
    pub async fn invalidate(self, url: impl AsRef<str>) -> Result<bool> {
        #[cfg(feature = "s3")]
        {
            let inner = self.cache.inner();
            if inner.tier.is_none() {
                return Err(no_tier());
            }
            let resolved = inner.resolver.resolve(url.as_ref())?;
            let found = self.cache.invalidate(url).await?;
            inner.forget_in_tier(&resolved).await?;
            Ok(found)
        }
        #[cfg(not(feature = "s3"))]
        {
            let _ = url;
            Err(no_tier())
        }
    }

    /// [`ImageCache::clear`], and every object of the tier (blobs, records and
    /// leases below its prefix). Returns the local entries and the tier's objects removed.
    /// Needs the `s3` feature and a tier, as
    /// [`invalidate`](Self::invalidate) does.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// let (entries, objects) = cache.tier().clear().await?;
    /// println!("removed {entries} local entries and {objects} objects of the tier");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) when no tier is configured; [`ErrorKind::Network`](crate::ErrorKind::Network) when
    /// the tier cannot be reached (the local entries are removed first).
    pub async fn clear(self) -> Result<(u64, u64)> {
        #[cfg(feature = "s3")]
        {
            if self.cache.inner().tier.is_none() {
                return Err(no_tier());
            }
            let local = self.cache.clear().await?;
            let objects = self.cache.inner().clear_tier().await?;
            tracing::info!(objects, "shared tier cleared");
            Ok((local, objects))
        }
        #[cfg(not(feature = "s3"))]
        Err(no_tier())
    }

    /// Waits until the uploads to the tier that downloads started are done (they
    /// run in the background; [`ImageCache::shutdown`](ImageCache::shutdown) waits for them too). Without the
    /// `s3` feature or a tier there are none, and it returns at once.
    ///
    /// ```no_run
    /// # async fn demo(cache: imgcache::ImageCache) -> imgcache::Result<()> {
    /// // Warm the tier for the fleet from one host, then tell the others to start.
    /// for url in ["ct/0042.nii.gz", "ct/0043.nii.gz"] {
    ///     cache.get(url).await?;
    /// }
    /// cache.tier().flush().await;
    /// println!("{} files published", cache.stats().shared_uploads);
    /// # Ok(()) }
    /// ```
    pub async fn flush(self) {
        self.cache.inner().uploads.idle().await;
    }
}

#[cfg(not(feature = "s3"))]
fn no_tier() -> Error {
    Error::new(
        ErrorKind::Config,
        "no shared tier: imgcache was built without the s3 feature",
    )
}

#[cfg(not(feature = "s3"))]
impl Inner {
    pub(super) fn tier_figures(&self) -> Option<(String, String)> {
        None
    }

    pub(super) async fn wait_for_uploads(&self) {
        self.uploads.idle().await;
    }
}

#[cfg(feature = "s3")]
impl Inner {
    /// The tier and its state, for [`Stats`](crate::Stats).
    pub(super) fn tier_figures(&self) -> Option<(String, String)> {
        self.tier.as_ref().map(|t| (t.shown.clone(), t.state()))
    }

    /// Removes the tier's record of `r` (the fleet asks the origin again).
    pub(super) async fn forget_in_tier(&self, r: &Resolved) -> Result<()> {
        match &self.tier {
            Some(tier) => tier.forget(&r.key).await,
            None => Err(no_tier()),
        }
    }

    /// Removes everything of the tier; how many objects went.
    pub(super) async fn clear_tier(&self) -> Result<u64> {
        match &self.tier {
            Some(tier) => tier.clear().await,
            None => Err(no_tier()),
        }
    }
}

#[cfg(feature = "s3")]
pub(super) fn no_tier() -> Error {
    Error::new(
        ErrorKind::Config,
        "no shared tier is configured (CACHE_SHARED_TIER)",
    )
}
