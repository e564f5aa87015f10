//! Unit tests of the index.

use std::path::{Path, PathBuf};

use super::*;
use crate::clock::ManualClock;
use crate::store::testing::{disk, key, put, tree};

const FAR: u64 = u64::MAX / 2;

/// Leaves removals as they are: these tests look at them and delete their trash themselves.
#[derive(Debug)]
struct Kept;

impl Disposer for Kept {
    fn dispose(&self, _: Vec<Removed>) {}
}

fn index(layout: &Layout, max: u64) -> Index {
    Index::new(
        layout.clone(),
        max,
        1000,
        Arc::new(ManualClock::new()),
        Arc::new(Kept),
    )
}

/// An index on `layout` holding entries `0..sizes.len()` of the given sizes, loaded in
/// that order (so entry 0 is the least recently used).
fn index_with(layout: &Layout, max: u64, sizes: &[usize]) -> Index {
    let index = index(layout, max);
    let entries = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let k = key(i as u64);
            let (meta, path) = put(layout, &k, &vec![b'x'; *size], FAR);
            let stamp = layout.meta_stamp(&k).unwrap();
            Entry::new(k, meta, path, i as u64, 0, 0).with_stamp(stamp)
        })
        .collect();
    index.load(entries);
    index
}

/// Entry 0 of "abc", expiring at `expires_at`, loaded into `index`: its meta and path.
fn load_one(index: &Index, layout: &Layout, expires_at: u64) -> (Meta, PathBuf) {
    let (meta, path) = put(layout, &key(0), b"abc", expires_at);
    let stamp = layout.meta_stamp(&key(0)).unwrap();
    index.load(vec![
        Entry::new(key(0), meta.clone(), path.clone(), 0, 0, 0).with_stamp(stamp),
    ]);
    (meta, path)
}

fn keys(removed: &[Removed]) -> Vec<Key> {
    removed.iter().map(|r| r.entry.key.clone()).collect()
}

fn hit(index: &Index, k: &Key, now: u64) -> Arc<Entry> {
    match index.lookup(k, now, None) {
        Lookup::Hit(entry) => entry,
        other => panic!("expected a hit, got {other:?}"),
    }
}

fn delete_trash(removed: &[Removed]) {
    for r in removed {
        if let Some(t) = &r.trash {
            if t.is_dir() {
                std::fs::remove_dir_all(t).unwrap();
            } else {
                std::fs::remove_file(t).unwrap();
            }
        }
    }
}

#[test]
fn eviction_follows_lru_order_and_a_lookup_moves_an_entry_to_the_back() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[10, 10, 10, 10]);
    // Entry 0 is used: 1 is now the least recently used.
    let used = hit(&index, &key(0), 5);
    assert!(index.unpin(&used).0.is_empty());
    let removed = index.set_max(25);
    assert_eq!(keys(&removed), vec![key(1), key(2)]);
    assert_eq!(index.figures().committed_bytes, 20);
    assert!(removed.iter().all(|r| r.reason == Reason::Evicted));
    // Their files went to the trash; the survivors' files are in place.
    for r in &removed {
        assert!(!r.entry.path.exists() && r.trash.as_deref().is_some_and(Path::exists));
    }
    delete_trash(&removed);
    assert!(tree(&layout.root.join("tmp")).is_empty());
    for k in [key(0), key(3)] {
        assert!(layout.meta_path(&k).exists());
    }
}

#[test]
fn expired_entries_are_evicted_before_fresh_ones() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[10, 10]);
    // The more recently used entry 1 has expired.
    let (meta, path) = put(&layout, &key(1), &[b'y'; 10], 0);
    let stamp = layout.meta_stamp(&key(1)).unwrap();
    index.load(vec![
        Entry::new(key(1), meta, path, 9, 0, 0).with_stamp(stamp),
    ]);
    let removed = index.set_max(15);
    assert_eq!(keys(&removed), vec![key(1)]);
    delete_trash(&removed);
}

#[test]
fn a_pinned_entry_is_skipped_by_eviction_and_doomed_by_removal() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[10, 20]);
    let held = hit(&index, &key(0), 1);
    assert!(held.is_pinned());
    // Eviction skips the held, least recently used entry and takes the next.
    let removed = index.set_max(15);
    assert_eq!(keys(&removed), vec![key(1)]);
    delete_trash(&removed);
    // Invalidating the held entry dooms it: its meta goes, its bytes stay and count.
    let gone = index.remove(&key(0), Reason::Invalidated);
    assert_eq!(gone.len(), 1);
    assert!(gone[0].trash.is_none());
    assert!(!layout.meta_path(&key(0)).exists() && held.path.exists());
    let f = index.figures();
    assert_eq!(
        (f.entries, f.committed_bytes, f.doomed_bytes, f.pinned),
        (0, 0, 10, 1)
    );
    assert!(matches!(index.lookup(&key(0), 1, None), Lookup::Missing));
    // A second pin on the doomed entry: the first unpin removes nothing.
    held.pins.fetch_add(1, Ordering::SeqCst);
    assert!(index.unpin(&held).0.is_empty());
    assert!(held.path.exists());
    // The last unpin takes its bytes away.
    let (removed, _) = index.unpin(&held);
    assert_eq!(keys(&removed), vec![key(0)]);
    assert!(!held.path.exists());
    delete_trash(&removed);
    let f = index.figures();
    assert_eq!((f.doomed_bytes, f.pinned), (0, 0));
    assert!(tree(&layout.root.join("entries")).is_empty());
}

#[test]
fn entries_held_above_the_cap_are_evicted_when_released() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[40, 40]);
    let a = hit(&index, &key(0), 1);
    let b = hit(&index, &key(1), 2);
    assert!(index.set_max(50).is_empty(), "both held");
    assert_eq!(index.figures().committed_bytes, 80);
    // The unpin evicts nothing (its caller may be handing the file out), and says the cap
    // is exceeded; the next sweep evicts.
    let (removed, over_cap) = index.unpin(&a);
    assert!(removed.is_empty(), "released, but not by its own unpin");
    assert!(over_cap, "the sweeper is to evict");
    let (removed, _) = index.sweep(0, true);
    assert_eq!(keys(&removed), vec![key(0)], "released and over the cap");
    delete_trash(&removed);
    let (removed, over_cap) = index.unpin(&b);
    assert!(removed.is_empty() && !over_cap, "40 bytes fit under 50");
}

#[test]
fn reservations_count_against_the_cap_and_come_back() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[30, 30, 30]);
    let removed = index.reserve(50);
    assert_eq!(
        keys(&removed),
        vec![key(0), key(1)],
        "LRU first, until 50 fit"
    );
    delete_trash(&removed);
    let f = index.figures();
    assert_eq!((f.committed_bytes, f.reserved_bytes), (30, 50));
    index.release(50);
    assert_eq!(index.figures().reserved_bytes, 0);
    // Releasing more than is reserved never underflows.
    index.release(1);
    assert_eq!(index.figures().reserved_bytes, 0);
}

#[test]
fn entries_another_process_removed_are_forgotten_before_real_files_are_evicted() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[30, 30, 30]);
    // Another process removed entries 1 and 2 since the last scan (not the least recently
    // used: that is 0): their meta.json and bytes are gone, and this index still counts them.
    for i in [1, 2] {
        let k = key(i);
        std::fs::remove_file(layout.meta_path(&k)).unwrap();
        let path = index.current(&k).unwrap().path.clone();
        std::fs::remove_file(path).unwrap();
    }
    let removed = index.reserve(50);
    let names = |k: &[Key]| {
        let mut n: Vec<String> = k.iter().map(|k| k.as_str().to_owned()).collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&keys(&removed)),
        names(&[key(1), key(2)]),
        "only the phantoms"
    );
    assert!(removed.iter().all(|r| r.reason == Reason::Replaced));
    delete_trash(&removed);
    assert_eq!(index.figures().committed_bytes, 30);
    assert!(
        index.current(&key(0)).unwrap().path.exists(),
        "the real file stays, though it is the least recently used"
    );
}

#[test]
fn a_commit_replaces_the_entry_and_releases_its_reservation() {
    let (_dir, layout) = disk();
    let index = index_with(&layout, 100, &[10]);
    let old = hit(&index, &key(0), 1);
    let old_bytes = std::fs::read(&old.path).unwrap();
    assert!(index.reserve(20).is_empty());
    let data = layout
        .write_temp(key(0).as_str(), "part", &[b'n'; 20])
        .unwrap();
    let mut meta = old.meta.clone();
    meta.size = 20;
    meta.generation = Layout::new_generation();
    let meta_file = layout
        .write_temp(key(0).as_str(), "meta", &serde_json::to_vec(&meta).unwrap())
        .unwrap();
    let path = layout.data_path(&key(0), &meta);
    assert_ne!(path, old.path, "each version has its own path");
    let entry = Entry::new(key(0), meta, path, 2, 0, 0);
    let held = std::fs::File::open(data.path()).unwrap();
    let (new, removed) = index.commit(entry, data, held, meta_file, 20, 2).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].reason, Reason::Replaced);
    assert!(removed[0].trash.is_none(), "held: the old bytes stay");
    let f = index.figures();
    assert_eq!((f.entries, f.committed_bytes, f.reserved_bytes), (1, 20, 0));
    assert_eq!(
        (f.doomed_bytes, f.pinned),
        (10, 2),
        "the old version waits for its holder"
    );
    assert!(new.is_pinned(), "pinned once for the download's callers");
    assert_eq!(
        std::fs::read(&old.path).unwrap(),
        old_bytes,
        "the holder's bytes never change"
    );
    // A later invalidation of the new version leaves the old holder's file alone.
    assert!(index.unpin(&new).0.is_empty());
    let gone = index.remove(&key(0), Reason::Invalidated);
    assert_eq!(gone.len(), 1);
    delete_trash(&gone);
    assert_eq!(std::fs::read(&old.path).unwrap(), old_bytes);
    // The old version goes with its last pin.
    let (removed, _) = index.unpin(&old);
    assert_eq!(keys(&removed), vec![key(0)]);
    assert!(!old.path.exists());
    delete_trash(&removed);
    assert_eq!(index.figures().doomed_bytes, 0);
    assert!(tree(&layout.root.join("entries")).is_empty());
}

#[test]
fn the_sweep_removes_entries_past_their_grace_unless_pinned() {
    let (_dir, layout) = disk();
    let index = index(&layout, 100);
    let entries = (0..3)
        .map(|i| {
            let (meta, path) = put(&layout, &key(i), b"abc", 100 * (i + 1));
            let stamp = layout.meta_stamp(&key(i)).unwrap();
            Entry::new(key(i), meta, path, 0, 0, 0).with_stamp(stamp)
        })
        .collect();
    index.load(entries);
    let held = index.pin_current(&key(0)).unwrap();
    // At 1250 entries 0 (expired at 100) and 1 (at 200) are past their 1000 ms of grace.
    let (removed, _) = index.sweep(1250, true);
    assert_eq!(keys(&removed), vec![key(1)], "the held entry stays");
    delete_trash(&removed);
    // Within its grace an entry is stale, not missing.
    assert!(matches!(
        index.lookup(&key(2), 1250, None),
        Lookup::Stale(_)
    ));
    assert!(matches!(index.lookup(&key(2), 1300, None), Lookup::Missing));
    drop(held);
}

#[test]
fn an_entry_another_process_renewed_is_neither_expired_nor_removed_on_an_old_reading() {
    let (_dir, layout) = disk();
    let index = index(&layout, 100);
    let (meta, path) = load_one(&index, &layout, 100);
    // Another process revalidated it: a new meta.json of the same version, fresh for long.
    let renewed = Meta {
        expires_at: FAR,
        ..meta
    };
    let json = serde_json::to_vec(&renewed).unwrap();
    let temp = layout.write_temp(key(0).as_str(), "meta", &json).unwrap();
    layout.replace_meta(&key(0), temp).unwrap();
    // This process still thinks it expired at 100: its sweep must not act on that.
    let (removed, _) = index.sweep(5000, true);
    assert!(removed.is_empty(), "{:?}", keys(&removed));
    assert!(path.exists() && layout.meta_path(&key(0)).exists());
    // An invalidation still takes it, whatever this process last read.
    let removed = index.remove(&key(0), Reason::Invalidated);
    assert_eq!(removed.len(), 1);
    assert!(!layout.meta_path(&key(0)).exists());
    delete_trash(&removed);
    assert!(!path.exists());
}

#[test]
fn a_cleanups_mark_on_a_held_entry_ends_when_the_entry_is_renewed() {
    let (_dir, layout) = disk();
    let index = index(&layout, 100);
    let (meta, path) = load_one(&index, &layout, 100);
    let held = index.pin_current(&key(0)).unwrap();
    // An explicit cleanup at 150 finds it expired and held: no grace left for it.
    assert_eq!(index.mark_kept_expired(150), 1);
    assert!(index.past_grace(&held, 150));
    // A 304 renews it to expire at 2000; expired again at 2100, it has its grace (1000 ms).
    let renewed = Meta {
        expires_at: 2000,
        ..meta
    };
    let json = serde_json::to_vec(&renewed).unwrap();
    let temp = layout.write_temp(key(0).as_str(), "meta", &json).unwrap();
    assert!(index.renew(&held, &renewed, temp).unwrap());
    assert!(!index.past_grace(&held, 2100), "the renewal ended the mark");
    assert!(index.past_grace(&held, 3000), "past its own grace");
    assert!(path.exists());
}
