//! Named crash points inside a commit, for the kill -9 tests.
//!
//! With the `failpoints` feature, `IMGCACHE_FAILPOINT=<name>` aborts the process when the
//! commit reaches the step of that name; without it every call compiles to nothing.

/// Aborts the process at the named step when `IMGCACHE_FAILPOINT` names it (crash tests).
#[cfg(feature = "failpoints")]
pub(crate) fn failpoint(name: &str) {
    if std::env::var("IMGCACHE_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("imgcache: failpoint {name}: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn failpoint(_name: &str) {}
