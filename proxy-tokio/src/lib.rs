//! The tokio adapter for switchyard: sockets, timers and tasks that drive
//! [`proxy_core::Session`]. It makes no protocol decisions of its own.
//!
//! Not built yet: this crate is filled in by the proxy-tokio issue. It exists now so that the
//! workspace has its final shape from the first commit.

pub use proxy_core;
