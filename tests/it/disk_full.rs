//! A full disk, on a real 8 MB tmpfs: a download first evicts to make room, and when nothing
//! can be evicted it fails cleanly (temp file removed, index consistent, old entries served).
//!
//! Needs permission to mount a tmpfs (root, as on this project's machines and CI). Where that
//! is refused the test prints SKIPPED and returns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::support::origin::{Origin, volume};
use crate::support::{builder, data_files, temp_files};
use imgcache::{ErrorKind, ManualClock};

use crate::MB;

struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mb: usize) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mb}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs {
            path: dir.path().to_owned(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_evicts_to_make_room_then_fails_cleanly() {
    let Some(fs) = Tmpfs::mount(8) else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (needs root); the disk-full case is untested"
        );
        return;
    };
    let origin = Origin::start().await;
    crate::support::route_volumes(&origin, &["a", "b", "c", "d"], 0, 3 * MB);
    let clock = Arc::new(ManualClock::new());
    // The cap (100 MB) is far above the disk (8 MB): only the disk can run out.
    let cache = builder(&fs.path, &clock)
        .max_size_bytes(100 * MB as u64)
        .build()
        .await
        .unwrap();
    let url = |n: &str| origin.url(&format!("{n}.nii.gz"));

    drop(cache.get(url("a")).await.unwrap());
    let b = cache.get(url("b")).await.unwrap();
    let c = cache.get(url("c")).await.unwrap(); // no room for three: a is evicted
    assert_eq!(std::fs::read(c.path()).unwrap(), volume(2, 3 * MB));
    assert!(cache.get_cached(url("a")).is_none(), "a made room");
    assert_eq!(cache.stats().evictions, 1);

    // b and c are held: nothing can be evicted, so d fails with a clear error.
    let err = cache.get(url("d")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err}");
    assert!(
        temp_files(&fs.path).is_empty(),
        "the partial file was removed"
    );
    // 8 MB less the 6 MB held: the partial's space came back (it had filled the disk).
    assert!(free_bytes(&fs.path) > MB as u64, "the space came back");
    assert_eq!(data_files(&fs.path).len(), 2);
    let stats = cache.stats();
    assert_eq!((stats.entries_count, stats.reserved_bytes), (2, 0));
    assert_eq!(stats.current_size_bytes, 6 * MB as u64);
    // The old entries are still served.
    assert_eq!(std::fs::read(b.path()).unwrap(), volume(1, 3 * MB));
    assert!(cache.get_cached(url("b")).is_some() && cache.get_cached(url("c")).is_some());

    // Once b is released, d fits by evicting it.
    drop(b);
    let d = cache.get(url("d")).await.unwrap();
    assert_eq!(std::fs::read(d.path()).unwrap(), volume(3, 3 * MB));
    drop((c, d));
    cache.shutdown().await;
}
