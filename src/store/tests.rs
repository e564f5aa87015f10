//! Unit tests of the store.

use super::testing::{disk, key, put, tree};
use super::*;

fn recovered_keys(report: &RecoveryReport) -> Vec<Key> {
    let mut keys: Vec<Key> = report.entries.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys
}

#[test]
fn recovery_keeps_valid_entries_and_removes_temp_files() {
    let (_dir, layout) = disk();
    let (meta, path) = put(&layout, &key(1), b"abc", 10);
    fs::write(layout.temp_path(&key(2), "part"), b"partial").unwrap();
    let report = recover(&layout).unwrap();
    assert_eq!(recovered_keys(&report), vec![key(1)]);
    assert_eq!(report.entries[0].meta, meta);
    assert_eq!(report.entries[0].path, path);
    assert_eq!(report.removed, 1);
    assert!(tree(&layout.tmp).is_empty());
}

#[test]
fn recovery_keeps_entries_written_before_versions_had_directories() {
    let (_dir, layout) = disk();
    let (meta, path) = super::testing::put_legacy(&layout, &key(3), b"old layout");
    assert_eq!(path.parent().unwrap(), layout.entry_dir(&key(3)));
    let report = recover(&layout).unwrap();
    assert_eq!(recovered_keys(&report), vec![key(3)]);
    assert_eq!(
        (&report.entries[0].meta, &report.entries[0].path),
        (&meta, &path)
    );
}

#[test]
fn recovery_keeps_only_the_version_meta_json_names() {
    let (_dir, layout) = disk();
    let (_, old) = put(&layout, &key(4), b"old", 10);
    let (meta, new) = put(&layout, &key(4), b"new", 10);
    assert!(old.exists() && new.exists());
    let report = recover(&layout).unwrap();
    assert_eq!(report.entries[0].meta, meta);
    assert!(new.exists());
    assert!(
        !old.parent().unwrap().exists(),
        "the older version's directory is removed"
    );
    // meta.json naming a version directory that is a link, or missing: invalid.
    let (meta, path) = put(&layout, &key(5), b"abc", 10);
    let version = path.parent().unwrap();
    fs::remove_dir_all(version).unwrap();
    std::os::unix::fs::symlink(layout.entry_dir(&key(4)).join(&meta.generation), version).unwrap();
    let report = recover(&layout).unwrap();
    assert_eq!(recovered_keys(&report), vec![key(4)]);
}

#[test]
fn recovery_removes_each_kind_of_invalid_entry() {
    type Damage = fn(&Layout, &Key, &Path);
    let cases: [(&str, Damage); 8] = [
        ("bytes without meta", |l, k, _| {
            fs::remove_file(l.meta_path(k)).unwrap()
        }),
        ("meta without bytes", |_, _, data| {
            fs::remove_file(data).unwrap()
        }),
        ("unparsable meta", |l, k, _| {
            fs::write(l.meta_path(k), b"{not json").unwrap()
        }),
        ("meta of another version", |l, k, _| {
            let raw = fs::read(l.meta_path(k)).unwrap();
            let mut meta: Meta = serde_json::from_slice(&raw).unwrap();
            meta.version = 2;
            fs::write(l.meta_path(k), serde_json::to_vec(&meta).unwrap()).unwrap();
        }),
        ("a file name that is not safe", |l, k, _| {
            let raw = fs::read(l.meta_path(k)).unwrap();
            let mut meta: Meta = serde_json::from_slice(&raw).unwrap();
            meta.file_name = "../escape".into();
            fs::write(l.meta_path(k), serde_json::to_vec(&meta).unwrap()).unwrap();
        }),
        ("data of the wrong size", |_, _, data| {
            fs::write(data, b"abcd").unwrap()
        }),
        ("data modified in place", |_, _, data| {
            let f = File::options().write(true).open(data).unwrap();
            f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
        }),
        ("meta.json that is a directory", |l, k, _| {
            fs::remove_file(l.meta_path(k)).unwrap();
            fs::create_dir(l.meta_path(k)).unwrap();
        }),
    ];
    for (what, damage) in cases {
        let (_dir, layout) = disk();
        put(&layout, &key(1), b"abc", 10);
        let (_, path) = put(&layout, &key(2), b"xyz", 10);
        damage(&layout, &key(2), &path);
        let report = recover(&layout).unwrap();
        assert_eq!(recovered_keys(&report), vec![key(1)], "{what}");
        assert_eq!(report.removed, 1, "{what}");
        assert!(
            !layout.entry_dir(&key(2)).exists(),
            "{what}: the directory is gone"
        );
        assert!(
            layout.meta_path(&key(1)).exists(),
            "{what}: the good entry stays"
        );
    }
}

#[test]
fn recovery_removes_stray_items_and_misplaced_keys() {
    let (_dir, layout) = disk();
    put(&layout, &key(1), b"abc", 10);
    fs::write(layout.entries.join("stray.txt"), b"x").unwrap();
    fs::create_dir_all(layout.entries.join("zz")).unwrap();
    let prefix = layout.entries.join(key(1).prefix());
    fs::create_dir_all(prefix.join("not-a-key")).unwrap();
    // A well-formed key below another key's prefix.
    let misplaced = layout.entries.join("ab").join(key(3).as_str());
    fs::create_dir_all(&misplaced).unwrap();
    // A leftover file beside a valid entry's data and meta.json.
    fs::write(layout.entry_dir(&key(1)).join("old.nii.gz"), b"old").unwrap();
    let report = recover(&layout).unwrap();
    assert_eq!(recovered_keys(&report), vec![key(1)]);
    assert_eq!(report.removed, 4);
    assert!(!misplaced.exists() && !prefix.join("not-a-key").exists());
    let left = tree(&layout.entries);
    assert_eq!(
        left.len(),
        2,
        "data and meta of the good entry only: {left:?}"
    );
}

/// A download's data and meta.json in temp files, and where the data of version 1 goes.
fn to_install(layout: &Layout, k: &Key) -> (TempFile, TempFile, PathBuf) {
    let data = layout.write_temp(k.as_str(), "part", b"bytes").unwrap();
    let meta = layout.write_temp(k.as_str(), "meta", b"{}").unwrap();
    let path = layout
        .entry_dir(k)
        .join("g0000000000000001")
        .join("a.nii.gz");
    (data, meta, path)
}

#[test]
fn install_moves_data_then_meta_and_trash_takes_the_data_away() {
    let (_dir, layout) = disk();
    let k = key(7);
    let (data, meta, path) = to_install(&layout, &k);
    let stamp = layout.install(&k, data, &path, meta).unwrap();
    assert_eq!(layout.meta_stamp(&k), Some(stamp));
    assert_eq!(fs::read(&path).unwrap(), b"bytes");
    assert!(layout.meta_path(&k).exists());
    assert!(tree(&layout.tmp).is_empty(), "both temp files were moved");
    // A pinned entry is withdrawn: its meta goes, its bytes stay.
    let generation = "g0000000000000001";
    layout.withdraw(&k, Stamp::default(), generation);
    assert!(
        layout.meta_path(&k).exists(),
        "another meta.json than the one known, of another version, stays"
    );
    layout.withdraw(&k, stamp, generation);
    assert!(!layout.meta_path(&k).exists() && path.exists());
    // Renewed by another process (a new meta.json of the same version): withdrawn too.
    fs::write(
        layout.meta_path(&k),
        format!(r#"{{"generation":"{generation}"}}"#),
    )
    .unwrap();
    assert!(layout.names_generation(&k, generation));
    layout.withdraw(&k, stamp, generation);
    assert!(!layout.meta_path(&k).exists() && path.exists());
    // Trashed: the data moves to a trash name and the directory goes.
    let trash = layout.trash(&k, &path).expect("moved to the trash");
    assert!(trash.starts_with(&layout.tmp) && !layout.entry_dir(&k).exists());
    assert_eq!(
        fs::read(trash.join("a.nii.gz")).unwrap(),
        b"bytes",
        "the version's directory"
    );
    layout.remove_any(&trash);
    assert!(layout.trash(&k, &path).is_none(), "nothing left to move");
}

#[test]
fn a_failed_install_leaves_nothing_of_the_new_entry() {
    let (_dir, layout) = disk();
    let k = key(8);
    let (data, meta, path) = to_install(&layout, &k);
    // The data's target is a directory: the rename fails.
    fs::create_dir_all(path.join("blocker")).unwrap();
    assert!(layout.install(&k, data, &path, meta).is_err());
    assert!(!layout.meta_path(&k).exists());
    assert!(tree(&layout.tmp).is_empty(), "the temp files are removed");
}
