//! `thinctl`, the real binary, driven as a person would: every command, every error
//! path, and round trips judged by Debian's thin-provisioning-tools.
//!
//! One test binary; the parts live in `tests/cli/`.

mod common;

#[path = "cli/support.rs"]
mod support;

#[path = "cli/commands.rs"]
mod commands;
#[path = "cli/fixtures.rs"]
mod fixtures;
#[path = "cli/images.rs"]
mod images;
#[path = "cli/safety.rs"]
mod safety;
#[path = "cli/serve.rs"]
mod serve;
#[path = "cli/xml.rs"]
mod xml;
