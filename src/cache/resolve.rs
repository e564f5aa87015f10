//! The resolver stage: the URLs callers write, resolved against the image server, normalised,
//! keyed and redacted, and remembered: parsing, normalising and hashing a URL costs more than
//! the rest of a hit together. It owns the image server, the URL policy and what it
//! remembers, nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;

use url::Url;

use crate::error::Result;
use crate::key::{self, Resolved, UrlPolicy};

/// Turns URLs as callers write them into what the cache keys, requests and shows.
pub(super) struct Resolver {
    image_server: Option<Url>,
    policy: UrlPolicy,
    remembered: Resolutions,
}

impl Resolver {
    pub(super) fn new(image_server: Option<Url>, policy: UrlPolicy) -> Resolver {
        Resolver {
            image_server,
            policy,
            remembered: Resolutions::default(),
        }
    }

    /// Resolves a URL as the caller wrote it. Parsing, normalising and hashing a URL costs
    /// more than the rest of a hit together, so results are remembered, in a map that is
    /// emptied when it reaches `RESOLVED_CAPACITY` (a bound, not an LRU: the work it saves is
    /// cheap to redo).
    pub(super) fn resolve(&self, url: &str) -> Result<Arc<Resolved>> {
        if let Some(found) = self.remembered.get(url) {
            return Ok(found);
        }
        let resolved = Arc::new(key::resolve_with(
            url,
            self.image_server.as_ref(),
            &self.policy,
        )?);
        self.remembered.insert(url, &resolved);
        Ok(resolved)
    }
}

/// How many resolved URLs are remembered at most.
const RESOLVED_CAPACITY: usize = 4096;
/// How many bytes of URLs (as written, resolved and shown) are remembered at most.
const RESOLVED_BYTES: usize = 4 << 20;

/// URLs as callers wrote them and what they resolve to, bounded in count and in bytes: when
/// either bound is reached the map is emptied (a bound, not an LRU: the work it saves is cheap
/// to redo).
#[derive(Default)]
struct Resolutions {
    // DashMap: read on every hit from any task; a guard never lives past one call.
    map: DashMap<Box<str>, Arc<Resolved>>,
    /// Bytes held, about: what `cost` says of each entry.
    bytes: AtomicUsize,
}

impl Resolutions {
    fn get(&self, url: &str) -> Option<Arc<Resolved>> {
        self.map.get(url).map(|found| Arc::clone(found.value()))
    }

    /// The memory an entry holds: the text as written, and the URL resolved, shown, keyed.
    fn cost(url: &str, resolved: &Resolved) -> usize {
        url.len()
            + resolved.request.as_str().len()
            + resolved.display.len()
            + resolved.file_name.len()
            + 64
            + 128
    }

    fn insert(&self, url: &str, resolved: &Arc<Resolved>) {
        let cost = Self::cost(url, resolved);
        if cost > RESOLVED_BYTES / 16 {
            return; // A URL this long is not worth the room.
        }
        if self.map.len() >= RESOLVED_CAPACITY
            || self.bytes.load(Ordering::Relaxed) + cost > RESOLVED_BYTES
        {
            self.map.clear();
            self.bytes.store(0, Ordering::Relaxed);
        }
        if self.map.insert(url.into(), Arc::clone(resolved)).is_none() {
            self.bytes.fetch_add(cost, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ImageCache;

    /// A cache in a temporary directory, with no background task.
    async fn bare_cache() -> (tempfile::TempDir, ImageCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::builder()
            .cache_dir(dir.path())
            .sweep_interval(Duration::ZERO)
            .state_save_interval(Duration::ZERO)
            .build()
            .await
            .unwrap();
        (dir, cache)
    }

    #[tokio::test]
    async fn resolved_urls_are_remembered_within_a_bound() {
        let (_dir, cache) = bare_cache().await;
        let inner = cache.inner();
        let a = inner.resolver.resolve("http://h/a.nii.gz").unwrap();
        let again = inner.resolver.resolve("http://h/a.nii.gz").unwrap();
        assert!(
            Arc::ptr_eq(&a, &again),
            "the second resolution is remembered"
        );
        // Equivalent spellings resolve to one key, remembered separately.
        let upper = inner.resolver.resolve("HTTP://H/a.nii.gz").unwrap();
        assert_eq!(upper.key, a.key);
        for i in 0..RESOLVED_CAPACITY + 10 {
            inner
                .resolver
                .resolve(&format!("http://h/{i}.nii.gz"))
                .unwrap();
            assert!(inner.resolver.remembered.len() <= RESOLVED_CAPACITY);
        }
        // Errors are not remembered.
        assert!(inner.resolver.resolve("ftp://h/x").is_err());
        assert!(inner.resolver.remembered.get("ftp://h/x").is_none());
    }

    #[tokio::test]
    async fn resolved_urls_are_bounded_in_bytes_too() {
        let (_dir, cache) = bare_cache().await;
        let inner = cache.inner();
        // Long URLs (100 KB of query each): far fewer than RESOLVED_CAPACITY fit.
        let long = "q".repeat(100_000);
        for i in 0..200 {
            inner
                .resolver
                .resolve(&format!("http://h/{i}.nii.gz?{long}"))
                .unwrap();
            assert!(inner.resolver.remembered.bytes.load(Ordering::Relaxed) <= RESOLVED_BYTES);
            assert!(inner.resolver.remembered.len() * 300_000 <= RESOLVED_BYTES + 300_000);
        }
        // A URL longer than a sixteenth of the bound is resolved every time, never kept.
        let huge = format!("http://h/x.nii.gz?{}", "z".repeat(RESOLVED_BYTES / 8));
        let a = inner.resolver.resolve(&huge).unwrap();
        assert!(inner.resolver.remembered.get(&huge).is_none());
        assert_eq!(inner.resolver.resolve(&huge).unwrap().key, a.key);
    }
}
