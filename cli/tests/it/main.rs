//! The command line's tests: the built `imgcache` binary run against origins on 127.0.0.1.
//! One binary, as the library's tests are; the origin fixture is theirs, shared by path.

// The library's fixtures serve its own tests too; these use a part of them.
#[allow(unreachable_pub)]
#[path = "../../../tests/it/support/mod.rs"]
mod support;

mod cli;
mod cli_manage;
