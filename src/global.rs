//! The process-wide cache, as the original design's module-level functions had it: one cache
//! built from the environment on first use, living in the runtime that first used it.

use tokio::sync::OnceCell;

use crate::{CachedFile, ImageCache, Result, Stats};

static DEFAULT_CACHE: OnceCell<ImageCache> = OnceCell::const_new();

/// The process-wide cache, built from the environment on first use.
///
/// # Errors
/// As [`ImageCache::from_env`]; a failed build is retried on the next call.
pub async fn default_cache() -> Result<&'static ImageCache> {
    DEFAULT_CACHE.get_or_try_init(ImageCache::from_env).await
}

/// The local path of `url` through the process-wide cache, downloading it if needed (the
/// original design's `get_cached_file`).
///
/// # Errors
/// As [`default_cache`] and [`ImageCache::get`].
///
/// # Cancel safety
/// As [`ImageCache::get`].
pub async fn get_cached_file(url: impl AsRef<str>) -> Result<CachedFile> {
    default_cache().await?.get(url).await
}

/// Removes every entry of the process-wide cache; returns how many there were.
///
/// # Errors
/// As [`default_cache`].
pub async fn clear_cache() -> Result<u64> {
    default_cache().await?.clear().await
}

/// The statistics of the process-wide cache.
///
/// # Errors
/// As [`default_cache`].
pub async fn get_cache_stats() -> Result<Stats> {
    Ok(default_cache().await?.stats())
}
