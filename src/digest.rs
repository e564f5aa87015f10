//! SHA-256 of the bytes the cache stores, as they stream and when a file is verified:
//! ring's, chosen by measurement (`cargo bench --bench digest`). With the
//! SHA extensions both ring and `sha2` hash 1391 MiB/s on this project's machine; without
//! them (older Xeons, common in hospitals; measured under valgrind, whose CPU has none)
//! `sha2`'s portable code takes 1.64 times ring's instructions (899 M against 548 M for
//! 16 MiB). ring is in every build already, for TLS. Short inputs (URL keys) keep `sha2`.

use std::fmt;

/// A running SHA-256.
#[derive(Clone)]
pub(crate) struct Sha256(ring::digest::Context);

impl Sha256 {
    pub(crate) fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }

    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest, in lower-case hex.
    pub(crate) fn hex(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

impl Default for Sha256 {
    fn default() -> Sha256 {
        Sha256::new()
    }
}

impl fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_is_sha256_in_any_chunking() {
        use sha2::Digest;
        let bytes: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 256) as u8).collect();
        let mut h = Sha256::new();
        for chunk in bytes.chunks(65_537) {
            h.update(chunk);
        }
        assert_eq!(h.hex(), hex::encode(sha2::Sha256::digest(&bytes)));
        assert_eq!(
            Sha256::new().hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
