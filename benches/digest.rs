//! SHA-256 backends on this machine, as a download feeds them (256 KiB chunks): the `sha2`
//! crate the cache hashes with, and `ring`'s, already in the tree for TLS. Prints MiB/s.
//!
//!     cargo bench --bench digest
//!     RUSTFLAGS='--cfg sha2_backend="soft"' cargo bench --bench digest   # sha2 without SHA-NI
//!     valgrind --tool=callgrind target/release/deps/digest-* --quick   # no SHA-NI under it
//!
//! The machines of hospitals include older Xeons without the SHA extensions; under valgrind
//! (whose CPU has none) the instruction counts of both backends compare those paths.

use std::hint::black_box;
use std::time::Instant;

use sha2::{Digest, Sha256};

const CHUNK: usize = 256 * 1024;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let total: usize = if quick { 16 << 20 } else { 512 << 20 };
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let rounds = total / CHUNK;
    let runs = if quick { 1 } else { 5 };
    println!(
        "SHA-NI on this CPU: {}; RUSTFLAGS: {:?}",
        std::is_x86_feature_detected!("sha"),
        option_env!("RUSTFLAGS").unwrap_or("")
    );
    let sha2 = best(runs, || {
        let mut h = Sha256::new();
        for _ in 0..rounds {
            h.update(black_box(&chunk));
        }
        black_box(h.finalize());
    });
    let ring = best(runs, || {
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        for _ in 0..rounds {
            h.update(black_box(&chunk));
        }
        black_box(h.finish());
    });
    let mib = (total >> 20) as f64;
    println!("| backend | MiB/s ({} MiB, best of {runs}) |", total >> 20);
    println!("|---|---|");
    println!("| sha2 0.10 | {:.0} |", mib / sha2);
    println!("| ring 0.17 | {:.0} |", mib / ring);
}

/// The best wall time of `runs` runs of `f`, in seconds.
fn best(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
