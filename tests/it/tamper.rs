//! A cache directory someone tampered with: links planted at every level lead nowhere, and a
//! `v1` directory that belongs to someone else is refused.

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};

use imgcache::ErrorKind;

use crate::support::origin::{Origin, Route, sha256_hex, volume};
use crate::support::{data_files, entry_dir_of, meta_of, open};

/// A directory outside the cache with files that must survive.
fn victim() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = ["keep.txt", "meta.json", "other.nii.gz"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for f in &files {
        std::fs::write(f, b"do not delete").unwrap();
    }
    (dir, files)
}

fn assert_untouched(files: &[PathBuf]) {
    for f in files {
        assert_eq!(
            std::fs::read(f).ok().as_deref(),
            Some(&b"do not delete"[..]),
            "{} was touched",
            f.display()
        );
    }
}

/// A cache in `dir` with one committed entry; returns the entry's data path.
async fn one_entry(dir: &Path, origin: &Origin) -> PathBuf {
    let (cache, _clock) = open(dir).await;
    let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
    let path = file.path().to_owned();
    drop(file);
    cache.shutdown().await;
    path
}

fn replace_with_link(place: &Path, target: &Path) {
    if std::fs::symlink_metadata(place).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(place).unwrap();
    } else {
        let _ = std::fs::remove_file(place);
    }
    symlink(target, place).unwrap();
}

#[tokio::test]
async fn links_planted_below_v1_are_removed_as_links_and_never_followed() {
    let origin = Origin::start().await;
    let body = volume(40, 200_000);
    origin.route("a.nii.gz", Route::ok(body.clone()));
    type Plant = fn(&Path, &Path, &Path);
    let plants: [(&str, Plant); 7] = [
        ("tmp", |v1, _, victim| {
            replace_with_link(&v1.join("tmp"), victim)
        }),
        ("entries", |v1, _, victim| {
            replace_with_link(&v1.join("entries"), victim)
        }),
        ("a prefix directory", |_, data, victim| {
            let prefix = entry_dir_of(data).parent().unwrap().to_owned();
            replace_with_link(&prefix, victim)
        }),
        ("an entry directory", |_, data, victim| {
            replace_with_link(&entry_dir_of(data), victim)
        }),
        ("a version directory", |_, data, victim| {
            replace_with_link(data.parent().unwrap(), victim)
        }),
        ("the data file", |_, data, victim| {
            // Same size and mtime as the data: only refusing the link keeps it out.
            let target = victim.join("other.nii.gz");
            let md = std::fs::metadata(data).unwrap();
            std::fs::write(&target, vec![b'v'; md.len() as usize]).unwrap();
            std::fs::File::options()
                .write(true)
                .open(&target)
                .unwrap()
                .set_modified(md.modified().unwrap())
                .unwrap();
            replace_with_link(data, &target);
        }),
        ("meta.json", |_, data, victim| {
            let meta = meta_of(data);
            std::fs::copy(&meta, victim.join("meta.json")).unwrap();
            replace_with_link(&meta, &victim.join("meta.json"));
        }),
    ];
    for (level, plant) in plants {
        let dir = tempfile::tempdir().unwrap();
        let data = one_entry(dir.path(), &origin).await;
        let (victim_dir, victim_files) = victim();
        plant(&dir.path().join("v1"), &data, victim_dir.path());
        // What the planting wrote into the victim must survive too.
        let mut watched = victim_files.clone();
        watched.retain(|f| !f.ends_with("other.nii.gz") && !f.ends_with("meta.json"));
        let before: Vec<_> = std::fs::read_dir(victim_dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();

        let (cache, _clock) = open(dir.path()).await;
        let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), body, "{level}");
        assert!(file.path().starts_with(dir.path()), "{level}");
        assert!(
            !std::fs::symlink_metadata(file.path())
                .unwrap()
                .file_type()
                .is_symlink(),
            "{level}"
        );
        drop(file);
        cache.shutdown().await;

        assert_untouched(&watched);
        for f in before {
            assert!(f.exists(), "{level}: {} was removed", f.display());
        }
        assert_eq!(data_files(dir.path()).len(), 1, "{level}");
    }
}

#[tokio::test]
async fn a_fifo_or_a_huge_file_in_place_of_meta_json_or_state_json_does_not_stop_the_start() {
    let origin = Origin::start().await;
    origin.route("a.nii.gz", Route::ok(volume(45, 10_000)));
    for (what, planted) in [("fifo", true), ("huge", false)] {
        let dir = tempfile::tempdir().unwrap();
        let data = one_entry(dir.path(), &origin).await;
        let meta = meta_of(&data);
        let state = dir.path().join("v1/state.json");
        for place in [&meta, &state] {
            std::fs::remove_file(place).unwrap();
            if planted {
                mkfifo(place);
            } else {
                let f = std::fs::File::create(place).unwrap();
                f.set_len(1 << 30).unwrap(); // sparse: a gigabyte that reads as zeros
            }
        }
        // Bounded: a start that blocked on the FIFO would hang here.
        let opened = tokio::time::timeout(std::time::Duration::from_secs(20), open(dir.path()))
            .await
            .unwrap_or_else(|_| panic!("{what}: the start hung"));
        let (cache, _clock) = opened;
        assert_eq!(
            cache.stats().entries_count,
            0,
            "{what}: the entry is gone, not trusted"
        );
        let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
        assert_eq!(std::fs::read(file.path()).unwrap(), volume(45, 10_000));
    }
}

#[tokio::test]
async fn a_v1_that_is_a_link_is_refused_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (victim_dir, victim_files) = victim();
    symlink(victim_dir.path(), dir.path().join("v1")).unwrap();
    let clock = std::sync::Arc::new(imgcache::ManualClock::new());
    let err = crate::support::builder(dir.path(), &clock)
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(err.path(), Some(dir.path().join("v1").as_path()));
    assert_untouched(&victim_files);
}

#[tokio::test]
async fn a_v1_owned_by_another_user_is_refused_unless_shared_with_our_group() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    let me = std::fs::metadata(dir.path()).unwrap();
    if std::os::unix::fs::chown(&v1, Some(4242), None).is_err() {
        println!("SKIPPED: changing a directory's owner needs root");
        return;
    }
    let clock = std::sync::Arc::new(imgcache::ManualClock::new());
    let build = |mode: u32| {
        crate::support::builder(dir.path(), &clock)
            .file_mode(mode)
            .build()
    };
    let err = build(0o600).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("belongs to user 4242"), "{err}");

    // A group cache: our group owns it and others cannot write.
    std::os::unix::fs::chown(&v1, Some(4242), Some(me.gid())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&v1, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_eq!(
        build(0o600).await.unwrap_err().kind(),
        ErrorKind::Config,
        "a private file mode still refuses it"
    );
    let shared = build(0o660)
        .await
        .expect("a group cache of our group opens");
    drop(shared);
    // Others may write: refused even for a group cache.
    std::fs::set_permissions(&v1, std::fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(build(0o660).await.unwrap_err().kind(), ErrorKind::Config);
    // Another group: refused.
    std::os::unix::fs::chown(&v1, None, Some(4343)).unwrap();
    std::fs::set_permissions(&v1, std::fs::Permissions::from_mode(0o770)).unwrap();
    assert_eq!(build(0o660).await.unwrap_err().kind(), ErrorKind::Config);
}

fn mkfifo(place: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(place)
        .status()
        .unwrap();
    assert!(made.success());
}

#[tokio::test]
async fn fifos_in_place_of_a_process_lock_a_part_file_or_a_data_file_hang_nothing() {
    let origin = Origin::start().await;
    let body = volume(46, 10_000);
    origin.route("a.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let data = one_entry(dir.path(), &origin).await;
    let key = entry_dir_of(&data).file_name().unwrap().to_owned();
    let key = key.to_str().unwrap();
    mkfifo(&dir.path().join("v1/procs/1-1-00000000.lock"));
    mkfifo(&dir.path().join(format!("v1/tmp/{key}.1-0-00000000.part")));
    let bounded = std::time::Duration::from_secs(20);
    let (cache, _clock) = tokio::time::timeout(bounded, open(dir.path()))
        .await
        .expect("the start hung on a FIFO");
    assert_eq!(cache.stats().entries_count, 1);
    // The data file swapped for a FIFO once the entry is known: a hit must not block.
    std::fs::remove_file(&data).unwrap();
    mkfifo(&data);
    let file = tokio::time::timeout(bounded, cache.get(origin.url("a.nii.gz")))
        .await
        .expect("the hit hung on a FIFO")
        .unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_ne!(file.path(), data, "downloaded again");
}

#[tokio::test]
async fn a_part_file_hard_linked_to_a_file_elsewhere_is_never_resumed_into() {
    let origin = Origin::start().await;
    let body = volume(47, 3 * crate::MB);
    origin.route("a.nii.gz", Route::ok(body.clone()).etag("\"a\""));
    let dir = tempfile::tempdir().unwrap();
    let data = one_entry(dir.path(), &origin).await;
    let key = entry_dir_of(&data)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(entry_dir_of(&data)).unwrap();
    // A file of the user's elsewhere (same file system), linked in as a dead download's part,
    // and a lock record that names it as resumable from its 1 MB mark.
    let (victim_dir, _) = victim();
    let precious = victim_dir.path().join("precious.bin");
    let kept = vec![b'p'; 2 * crate::MB];
    std::fs::write(&precious, &kept).unwrap();
    let part = format!("{key}.1-0-00000000.part");
    let linked = dir.path().join("v1/tmp").join(&part);
    if std::fs::hard_link(&precious, &linked).is_err() {
        println!("SKIPPED: the temp directory is on another file system");
        return;
    }
    let lock = dir
        .path()
        .join("v1/locks")
        .join(&key[..2])
        .join(format!("{key}.lock"));
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let record = format!(
        r#"{{"part":"{part}","etag":"\"a\"","last_modified":null,"total":{},"durable":{}}}"#,
        body.len(),
        crate::MB
    );
    std::fs::write(&lock, record).unwrap();
    // Recovery may keep it (the record names it); the download must not use it.
    let (cache, _clock) = open(dir.path()).await;
    let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert_eq!(
        std::fs::read(&precious).unwrap(),
        kept,
        "the linked file is untouched"
    );
    assert!(
        origin.seen().iter().all(|s| s.header("range").is_none()),
        "no resume from a linked part"
    );
}

/// Whether any item from `dir` down to `path` is a link.
fn through_a_link(dir: &Path, path: &Path) -> bool {
    path.ancestors()
        .take_while(|p| p.starts_with(dir) && *p != dir)
        .any(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
}

/// Plants a link to `target` at every `v1/entries/<pp>` and `v1/locks/<pp>` not there yet,
/// and in place of `v1/tmp` and `v1/procs`: wherever the next download of any URL goes.
fn plant_everywhere(v1: &Path, target: &Path) {
    for parent in ["entries", "locks"] {
        for pp in 0..=255u8 {
            let place = v1.join(parent).join(format!("{pp:02x}"));
            if std::fs::symlink_metadata(&place).is_err() {
                symlink(target, &place).unwrap();
            }
        }
    }
    for place in ["tmp", "procs"] {
        let place = v1.join(place);
        std::fs::rename(&place, v1.join(format!("{}.moved", place.display()))).unwrap();
        symlink(target, &place).unwrap();
    }
}

fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut items: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    items.sort();
    items
}

#[tokio::test]
async fn links_planted_while_the_cache_runs_are_not_followed_by_a_download() {
    let origin = Origin::start().await;
    let (a, b) = (volume(61, 300_000), volume(62, 300_000));
    origin.route("a.nii.gz", Route::ok(a.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let a_data = cache
        .get(origin.url("a.nii.gz"))
        .await
        .unwrap()
        .path()
        .to_owned();
    // A key is the SHA-256 of the URL (these need no normalising): `b` is a URL whose fan-out
    // directory is not `a`'s, so that its way goes through a planted link.
    let a_entry = entry_dir_of(&a_data);
    assert_eq!(
        a_entry.file_name().unwrap().to_str().unwrap(),
        sha256_hex(origin.url("a.nii.gz").as_bytes())
    );
    let b_name = (0..)
        .map(|i| format!("b{i}.nii.gz"))
        .find(|name| {
            sha256_hex(origin.url(name).as_bytes())[..2]
                != *a_entry
                    .parent()
                    .unwrap()
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
        })
        .unwrap();
    origin.route(&b_name, Route::ok(b.clone()));

    let (victim_dir, victim_files) = victim();
    plant_everywhere(&dir.path().join("v1"), victim_dir.path());
    let b_prefix = dir
        .path()
        .join("v1/entries")
        .join(&sha256_hex(origin.url(&b_name).as_bytes())[..2]);
    assert!(std::fs::symlink_metadata(&b_prefix).unwrap().is_symlink());
    let file = cache.get(origin.url(&b_name)).await.unwrap();
    assert_eq!(std::fs::read(file.path()).unwrap(), b);
    assert!(file.path().starts_with(dir.path()));
    assert!(
        !through_a_link(dir.path(), file.path()),
        "{}",
        file.path().display()
    );
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut file.open().unwrap(), &mut read).unwrap();
    assert_eq!(read, b);
    drop(file);
    cache.shutdown().await;

    assert_untouched(&victim_files);
    assert_eq!(listing(victim_dir.path()), {
        let mut files = victim_files.clone();
        files.sort();
        files
    });
    // Both entries are the cache's, in its own directories, for the next process too.
    let (cache, _clock) = open(dir.path()).await;
    assert_eq!(cache.stats().entries_count, 2);
    let file = cache.get(origin.url(&b_name)).await.unwrap();
    assert_eq!(file.status(), imgcache::CacheStatus::Hit);
    assert_eq!(origin.hits(&b_name), 1);
}

/// Moves the fan-out directory of `data` out of the cache to `to`, puts a link in its place,
/// and puts another file there in place of the data file: other bytes of the same size and
/// mtime. (Bytes changed in place, in the same inode, are what only `verify` finds, link or
/// no link.)
fn move_behind_a_link(data: &Path, to: &Path) -> PathBuf {
    let prefix = entry_dir_of(data).parent().unwrap().to_owned();
    std::fs::rename(&prefix, to).unwrap();
    symlink(to, &prefix).unwrap();
    let moved = to.join(data.strip_prefix(&prefix).unwrap());
    let md = std::fs::metadata(&moved).unwrap();
    std::fs::remove_file(&moved).unwrap();
    std::fs::write(&moved, vec![b'v'; md.len() as usize]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&moved)
        .unwrap()
        .set_modified(md.modified().unwrap())
        .unwrap();
    moved
}

#[tokio::test]
async fn an_entry_moved_behind_a_link_while_the_cache_runs_is_never_served() {
    let origin = Origin::start().await;
    let body = volume(63, 200_000);
    origin.route("a.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let data = cache
        .get(origin.url("a.nii.gz"))
        .await
        .unwrap()
        .path()
        .to_owned();
    let outside = tempfile::tempdir().unwrap();
    let moved = move_behind_a_link(&data, &outside.path().join("moved"));

    let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut file.open().unwrap(), &mut read).unwrap();
    assert_eq!(
        read, body,
        "the cache's own bytes, not the ones behind the link"
    );
    assert_eq!(std::fs::read(file.path()).unwrap(), body);
    assert!(
        !through_a_link(dir.path(), file.path()),
        "{}",
        file.path().display()
    );
    assert_eq!(
        origin.hits("a.nii.gz"),
        2,
        "fetched again, into the cache's own directory"
    );
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        vec![b'v'; body.len()],
        "what lies behind the link is left alone"
    );
}

#[tokio::test]
async fn a_handed_out_file_opens_as_the_file_the_cache_holds_wherever_its_path_leads() {
    let origin = Origin::start().await;
    let body = volume(64, 100_000);
    origin.route("a.nii.gz", Route::ok(body.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = open(dir.path()).await;
    let file = cache.get(origin.url("a.nii.gz")).await.unwrap();
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut file.open().unwrap(), &mut read).unwrap();
    assert_eq!(read, body);

    let read_all = |file: &imgcache::CachedFile| {
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut file.open().unwrap(), &mut read).unwrap();
        read
    };
    let outside = tempfile::tempdir().unwrap();
    let moved = move_behind_a_link(file.path(), &outside.path().join("moved"));
    assert_eq!(
        std::fs::read(file.path()).unwrap(),
        vec![b'v'; body.len()],
        "the path leads to the other file"
    );
    assert_eq!(
        read_all(&file),
        body,
        "open() reads the file the cache holds"
    );
    // Another file at the path itself, no link on the way: the same.
    std::fs::remove_file(entry_dir_of(file.path()).parent().unwrap()).unwrap();
    std::fs::create_dir_all(file.path().parent().unwrap()).unwrap();
    std::fs::write(file.path(), vec![b'w'; body.len()]).unwrap();
    assert_eq!(read_all(&file), body);
    // Two handles, two positions.
    let (mut one, mut two) = (file.open().unwrap(), file.open().unwrap());
    let mut first = [0u8; 10];
    std::io::Read::read_exact(&mut one, &mut first).unwrap();
    std::io::Read::read_exact(&mut two, &mut first).unwrap();
    assert_eq!(first, body[..10]);
    assert_eq!(std::fs::read(&moved).unwrap(), vec![b'v'; body.len()]);
}

#[tokio::test]
async fn an_entry_moved_behind_a_link_is_evicted_before_the_cache_s_own() {
    let origin = Origin::start().await;
    for i in 0..8 {
        origin.route(&format!("e{i}.nii.gz"), Route::ok(volume(80 + i, 1000)));
    }
    let prefix_of =
        |i: u64| sha256_hex(origin.url(&format!("e{i}.nii.gz")).as_bytes())[..2].to_owned();
    // Three URLs in three fan-out directories: the oldest goes behind a link.
    let mut picked = vec![0u64];
    for i in 1..8 {
        if picked.len() < 3 && picked.iter().all(|p| prefix_of(*p) != prefix_of(i)) {
            picked.push(i);
        }
    }
    let [old, kept, new] = picked[..] else {
        panic!("{picked:?}")
    };
    let dir = tempfile::tempdir().unwrap();
    let (cache, _clock) = crate::support::open_capped(dir.path(), 2500).await;
    let old_data = cache
        .get(origin.url(&format!("e{old}.nii.gz")))
        .await
        .unwrap()
        .path()
        .to_owned();
    let kept_data = cache
        .get(origin.url(&format!("e{kept}.nii.gz")))
        .await
        .unwrap()
        .path()
        .to_owned();
    let outside = tempfile::tempdir().unwrap();
    let moved = move_behind_a_link(&old_data, &outside.path().join("moved"));

    // Over the cap: the entry whose bytes are no longer in the cache goes, not a real one.
    drop(
        cache
            .get(origin.url(&format!("e{new}.nii.gz")))
            .await
            .unwrap(),
    );
    assert_eq!(std::fs::read(&kept_data).unwrap(), volume(80 + kept, 1000));
    assert!(
        cache
            .get_cached(origin.url(&format!("e{kept}.nii.gz")))
            .is_some()
    );
    assert!(
        cache
            .get_cached(origin.url(&format!("e{old}.nii.gz")))
            .is_none()
    );
    assert_eq!(
        std::fs::read(&moved).unwrap(),
        vec![b'v'; 1000],
        "nothing behind the link touched"
    );
}
