//! The smol / async-std adapter for switchyard (both executors sit on async-io), driving
//! [`proxy_core::Session`]. It makes no protocol decisions of its own.
//!
//! Not built yet: this crate is filled in by the proxy-smol issue. It exists now so that the
//! workspace has its final shape from the first commit.

pub use proxy_core;
