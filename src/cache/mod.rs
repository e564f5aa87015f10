//! The cache: [`ImageCache`] (in `handle`) and the stages behind it, each a file of its own
//! with what it owns; `engine` holds the state they share.
//!
//! The stages live beside it, in the order a `get` meets them: [`resolve`] (the URL,
//! remembered), [`hit`] (lookup, cheap check, pin), [`inflight`] (join or start the one
//! download), [`wants`] (what its callers ask of it), [`download`] (fetch with retries,
//! stream, hash), `tier_read` (the tier before the origin, and the upload after), [`commit`]
//! (meta.json, install, renew) or [`unstored`] (an answer the origin said not to store,
//! handed out and never kept), then [`removal`] (what leaves the index is counted and
//! deleted) and the background [`sweeper`]; [`state`] keeps state.json and [`file`] the types
//! callers hold. [`open`] opens a cache and [`stream`] reads a file while it downloads.
//! [`handle`] has the handle's figures and removals, [`admin`] the operator's view, and
//! [`tier_admin`] the tier's view and the uploads it waits for.

mod admin;
mod admit;
mod announce;
mod commit;
mod download;
mod engine;
mod file;
mod handle;
mod hit;
mod inflight;
mod open;
mod outage;
mod pin;
mod procs;
mod removal;
mod resolve;
mod state;
mod stream;
mod sweeper;
mod tier_admin;
#[cfg(feature = "s3")]
mod tier_read;
#[cfg(feature = "s3")]
mod tier_upload;
mod transfer;
mod unstored;
mod uploads;
mod wants;

pub use admin::Admin;
pub use file::{
    CacheStatus, CachedFile, CleanupReport, EntryInfo, GetOptions, OnProgress, Verification,
    VerifyReport,
};
pub use handle::ImageCache;
pub use removal::CleanupPreview;
pub use stream::FileStream;
pub use tier_admin::TierAdmin;
