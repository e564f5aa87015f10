//! Criterion benchmarks, each beside the baseline it is judged against.
//!
//! ```text
//! cargo bench --bench cache                 # everything (about 6 minutes)
//! cargo bench --bench cache -- hit          # one group: hit, coalescing, cold_1gib, startup
//! ```
//!
//! - `hit`: `get` on a cached entry (one task, and 64 tasks on the multi-thread runtime)
//!   against `tokio::fs::metadata` on the same file, the floor of any async check that touches
//!   disk, and `std::fs::metadata`, the one stat the hit path makes.
//! - `coalescing`: 64 tasks asking for one cold 64 MiB URL against one task downloading it.
//! - `cold_1gib`: a 1 GiB download through the cache, against a plain reqwest stream written to
//!   a file (no hashing) and SHA-256 alone over the same bytes in memory.
//! - `startup`: `build()` on a cache directory holding 10,000 entries.

#[path = "../tests/it/support/origin.rs"]
mod origin;

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use imgcache::ImageCache;
use origin::{Origin, Route, volume};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

const MIB: usize = 1024 * 1024;
const GIB: usize = 1024 * MIB;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn open(dir: &Path, max: u64) -> ImageCache {
    ImageCache::builder()
        .cache_dir(dir)
        .max_size_bytes(max)
        .sweep_interval(Duration::ZERO)
        .build()
        .await
        .unwrap()
}

fn hit(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (_origin, cache, url, path) = rt.block_on(async {
        let origin = Origin::start().await;
        origin.route("ct.nii.gz", Route::ok(volume(1, 16 * MIB)));
        let cache = open(dir.path(), GIB as u64).await;
        let url = origin.url("ct.nii.gz");
        let path = cache.get(&url).await.unwrap().path().to_owned();
        (origin, cache, url, path)
    });
    let mut group = c.benchmark_group("hit");
    // Each call's file is dropped at once: every call is the process's first pin of the file
    // (open, flock, fstat, lstat of meta.json, and a close when it is dropped).
    group.bench_function("imgcache_get", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get(&url).await.unwrap() })
    });
    // Another CachedFile of the entry is held meanwhile: each call re-pins a file the process
    // already holds (fstat of the held file, lstat of meta.json).
    let holder = rt.block_on(cache.get(&url)).unwrap();
    group.bench_function("imgcache_get_held", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.get(&url).await.unwrap() })
    });
    group.bench_function("tokio_fs_metadata", |b| {
        b.to_async(&rt)
            .iter(|| async { tokio::fs::metadata(&path).await.unwrap() })
    });
    // The floor of the hit path's own check, which is one synchronous stat.
    group.bench_function("std_fs_metadata", |b| {
        b.iter(|| std::fs::metadata(&path).unwrap())
    });
    const TASKS: u64 = 64;
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("imgcache_get", "64_tasks"), |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(TASKS);
            rt.block_on(async {
                let started = Instant::now();
                let tasks = (0..TASKS).map(|_| {
                    let (cache, url) = (cache.clone(), url.clone());
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            cache.get(&url).await.unwrap();
                        }
                    })
                });
                join_all(tasks).await;
                started
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * TASKS) as f64)
            })
        })
    });
    group.bench_function(BenchmarkId::new("tokio_fs_metadata", "64_tasks"), |b| {
        b.iter_custom(|iters| {
            let per_task = iters.div_ceil(TASKS);
            rt.block_on(async {
                let started = Instant::now();
                let tasks = (0..TASKS).map(|_| {
                    let path = path.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            tokio::fs::metadata(&path).await.unwrap();
                        }
                    })
                });
                join_all(tasks).await;
                started
                    .elapsed()
                    .mul_f64(iters as f64 / (per_task * TASKS) as f64)
            })
        })
    });
    drop(holder);
    group.finish();
}

fn coalescing(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (origin, cache) = rt.block_on(async {
        let origin = Origin::start().await;
        origin.route("cold.nii.gz", Route::ok(volume(2, 64 * MIB)));
        (origin, open(dir.path(), GIB as u64).await)
    });
    let url = origin.url("cold.nii.gz");
    let mut group = c.benchmark_group("coalescing");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(64 * MIB as u64));
    for tasks in [1usize, 64] {
        group.bench_with_input(
            BenchmarkId::new("cold_64mib", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let before = origin.hits("cold.nii.gz");
                        total += rt.block_on(async {
                            let started = Instant::now();
                            let all = (0..tasks).map(|_| {
                                let (cache, url) = (cache.clone(), url.clone());
                                tokio::spawn(async move { cache.get(&url).await.unwrap().size() })
                            });
                            for size in join_all(all).await {
                                assert_eq!(size.unwrap(), 64 * MIB as u64);
                            }
                            let elapsed = started.elapsed();
                            cache.invalidate(&url).await.unwrap();
                            elapsed
                        });
                        assert_eq!(origin.hits("cold.nii.gz"), before + 1, "one origin request");
                    }
                    total
                })
            },
        );
    }
    group.finish();
}

fn cold_1gib(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let body = volume(3, GIB);
    let (origin, cache) = rt.block_on(async {
        let origin = Origin::start().await;
        origin.route("big.nii.gz", Route::ok(body.clone()));
        (origin, open(dir.path(), 2 * GIB as u64).await)
    });
    let url = origin.url("big.nii.gz");
    let client = reqwest::Client::new();
    let mut group = c.benchmark_group("cold_1gib");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Bytes(GIB as u64));
    group.bench_function("imgcache_get", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let started = Instant::now();
                    let file = cache.get(&url).await.unwrap();
                    let elapsed = started.elapsed();
                    assert_eq!(file.size(), GIB as u64);
                    drop(file);
                    cache.invalidate(&url).await.unwrap();
                    elapsed
                });
            }
            total
        })
    });
    let plain = dir.path().join("plain.bin");
    group.bench_function("reqwest_to_file_no_hash", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let started = Instant::now();
                    let mut response = client.get(&url).send().await.unwrap();
                    let file = tokio::fs::File::create(&plain).await.unwrap();
                    let mut out = tokio::io::BufWriter::with_capacity(MIB, file);
                    while let Some(chunk) = response.chunk().await.unwrap() {
                        out.write_all(&chunk).await.unwrap();
                    }
                    out.flush().await.unwrap();
                    out.get_ref().sync_data().await.unwrap();
                    let elapsed = started.elapsed();
                    tokio::fs::remove_file(&plain).await.unwrap();
                    elapsed
                });
            }
            total
        })
    });
    group.bench_function("sha256_in_memory", |b| b.iter(|| Sha256::digest(&body)));
    group.finish();
}

fn startup(c: &mut Criterion) {
    const ENTRIES: usize = 10_000;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let origin = Origin::start().await;
        let body = volume(4, 4096);
        for i in 0..ENTRIES {
            origin.route(&format!("s/{i}.nii.gz"), Route::ok(body.clone()));
        }
        let cache = open(dir.path(), GIB as u64).await;
        let urls: Vec<String> = (0..ENTRIES)
            .map(|i| origin.url(&format!("s/{i}.nii.gz")))
            .collect();
        for batch in urls.chunks(64) {
            for got in join_all(batch.iter().map(|u| cache.get(u))).await {
                got.unwrap();
            }
        }
        assert_eq!(cache.stats().entries_count, ENTRIES as u64);
        cache.shutdown().await;
    });
    let mut group = c.benchmark_group("startup");
    group.sample_size(10);
    group.bench_function("build_10000_entries", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(async {
                    let started = Instant::now();
                    let cache = open(dir.path(), GIB as u64).await;
                    let elapsed = started.elapsed();
                    assert_eq!(cache.stats().entries_count, ENTRIES as u64);
                    elapsed
                });
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, hit, coalescing, cold_1gib, startup);
criterion_main!(benches);
