//! Named fault points inside a commit, for the crash and fault tests.
//!
//! Built with `--cfg imgcache_failpoints` (`IMGCACHE_FAILPOINTS=1` at build time, see
//! build.rs), `IMGCACHE_FAILPOINT=<name>` aborts the process when the commit reaches the
//! step of that name, `<name>:sleep=<ms>` pauses there, and `<name>:error` makes a
//! [`failpoint_error`] step fail with an I/O error. Without the cfg every call compiles to
//! nothing. A cfg and not a feature, so that no dependent crate can switch it on.

/// What the environment asks of the step `name`, if anything.
#[cfg(imgcache_failpoints)]
fn action(name: &str) -> Option<String> {
    let spec = std::env::var("IMGCACHE_FAILPOINT").ok()?;
    let (point, action) = spec.split_once(':').unwrap_or((&spec, "abort"));
    (point == name).then(|| action.to_owned())
}

/// Aborts or pauses the process at the named step, as `IMGCACHE_FAILPOINT` says.
#[cfg(imgcache_failpoints)]
pub(crate) fn failpoint(name: &str) {
    match action(name).as_deref() {
        None | Some("error") => {}
        Some(sleep) if sleep.starts_with("sleep=") => {
            let ms = sleep["sleep=".len()..].parse().unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        Some(_) => {
            eprintln!("imgcache: failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

/// [`failpoint`], and an I/O error when `IMGCACHE_FAILPOINT` says `<name>:error`.
#[cfg(imgcache_failpoints)]
pub(crate) fn failpoint_error(name: &str) -> std::io::Result<()> {
    if action(name).as_deref() == Some("error") {
        return Err(std::io::Error::other(format!("failpoint {name}")));
    }
    failpoint(name);
    Ok(())
}

#[cfg(not(imgcache_failpoints))]
#[inline(always)]
pub(crate) fn failpoint(_name: &str) {}

#[cfg(not(imgcache_failpoints))]
#[inline(always)]
pub(crate) fn failpoint_error(_name: &str) -> std::io::Result<()> {
    Ok(())
}
