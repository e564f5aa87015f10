//! Fixtures for the unit tests of the store and the index: a layout in a temp directory and
//! entries written to it as a commit would leave them.

use super::*;

/// A cache directory with its `v1` tree created.
pub(crate) fn disk() -> (tempfile::TempDir, Layout) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path(), 0o600, 0o700);
    for d in [&layout.root, &layout.entries, &layout.tmp] {
        layout.create_dir_all(d).unwrap();
    }
    (dir, layout)
}

/// The `i`-th well-formed key.
pub(crate) fn key(i: u64) -> Key {
    Key::parse(&format!("{i:064x}")).unwrap()
}

/// Writes `bytes` and a matching meta.json as entry `key` (a version in its own directory),
/// expiring at `expires_at`.
pub(crate) fn put(layout: &Layout, key: &Key, bytes: &[u8], expires_at: u64) -> (Meta, PathBuf) {
    put_version(layout, key, bytes, expires_at, &Layout::new_generation())
}

/// [`put`] as an entry written before versions had directories: its bytes beside meta.json.
pub(crate) fn put_legacy(layout: &Layout, key: &Key, bytes: &[u8]) -> (Meta, PathBuf) {
    put_version(layout, key, bytes, u64::MAX / 2, "")
}

fn put_version(
    layout: &Layout,
    key: &Key,
    bytes: &[u8],
    expires_at: u64,
    generation: &str,
) -> (Meta, PathBuf) {
    let file_name = format!("{}.nii.gz", &key.as_str()[60..]);
    let mut meta = Meta {
        version: 1,
        url: format!("http://h/{file_name}"),
        file_name,
        sha256: "0".repeat(64),
        size: bytes.len() as u64,
        mtime_ns: 0,
        etag: None,
        last_modified: None,
        fetched_at: 0,
        expires_at,
        generation: generation.to_owned(),
    };
    let path = layout.data_path(key, &meta);
    layout.create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, bytes).unwrap();
    meta.mtime_ns = mtime_ns(&fs::metadata(&path).unwrap());
    fs::write(layout.meta_path(key), serde_json::to_vec(&meta).unwrap()).unwrap();
    (meta, path)
}

/// Every file below `dir`, relative to it.
pub(crate) fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for item in fs::read_dir(&d).unwrap().flatten() {
            let p = item.path();
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}
