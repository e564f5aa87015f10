//! The integration tests, one binary with a module per concern, so that the crate and its
//! dependencies are linked once. Every origin runs on 127.0.0.1; time moves through
//! `ManualClock`.
//!
//! Tests that need a process of their own (a kill -9, a count of the process's file
//! descriptors, environment variables set before first use) run this binary again as a
//! child: `crate::support::run_child`.

mod support;

mod capacity;
mod coalescing;
mod crash;
mod disk_full;
mod downloads;
mod events;
mod expiry;
mod faults;
mod headers;
mod hostile;
mod leaks;
mod no_store;
mod outage;
mod persistence;
mod process_wide;
mod processes;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "s3")]
mod shared;
mod streaming;
mod stress;
mod tamper;
mod tls;
mod urls;
mod versions;
mod wiremock;

/// One mebibyte, for sizes of test volumes.
pub const MB: usize = 1024 * 1024;
