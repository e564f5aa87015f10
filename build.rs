//! `--cfg imgcache_failpoints` for the crash tests, when `IMGCACHE_FAILPOINTS=1` is set at
//! build time (as CI and the README's test command do). A cfg, not a cargo feature: no
//! crate that depends on this one can switch the abort points on for everyone in its
//! dependency graph. `RUSTFLAGS="--cfg imgcache_failpoints"` works too.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(imgcache_failpoints)");
    println!("cargo::rerun-if-env-changed=IMGCACHE_FAILPOINTS");
    if std::env::var_os("IMGCACHE_FAILPOINTS").is_some_and(|v| v == "1") {
        println!("cargo::rustc-cfg=imgcache_failpoints");
    }
}
