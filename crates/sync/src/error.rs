//! Errors of transfers, sorted by what the caller should do about them.

use strata_store::{ChunkId, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The local store failed (or refused something, e.g. a ref conflict).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The connection failed or timed out; running the transfer again resumes it.
    #[error("hub unreachable or connection lost: {0}")]
    Transport(String),
    /// The hub answered with an error status.
    #[error("hub refused the request ({status}): {message}")]
    Hub {
        status: u16,
        code: String,
        message: String,
    },
    /// A credential is missing, wrong or revoked (HTTP 401).
    #[error("hub refused the credential: {0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed to do this (HTTP 403).
    #[error("not allowed: {0}")]
    Forbidden(String),
    /// A branch moved under us (compare-and-swap failed); nothing was changed.
    #[error("ref conflict: {0}")]
    Conflict(String),
    /// An object failed its hash check twice (or a peer sent something unasked).
    #[error("object {id} arrived damaged: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    /// The other side does not hold an object it should.
    #[error("the {side} lacks object {id}")]
    Missing { side: &'static str, id: ChunkId },
    /// A body ended before its end frame (the connection was cut).
    #[error("object stream cut short")]
    Truncated,
    /// Malformed data on the wire.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<std::io::Error> for SyncError {
    fn from(e: std::io::Error) -> SyncError {
        SyncError::Protocol(e.to_string())
    }
}

impl From<reqwest::Error> for SyncError {
    fn from(e: reqwest::Error) -> SyncError {
        // The chain carries the useful part (connection refused, reset, timed out).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        let mut tls = false;
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            // A certificate the point does not trust fails the same way every time:
            // not a link failure to retry.
            tls |= s.downcast_ref::<rustls::Error>().is_some()
                || s.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some());
            src = s.source();
        }
        if tls || msg.contains("invalid peer certificate") {
            return SyncError::Invalid(format!("TLS with the hub failed: {msg}"));
        }
        SyncError::Transport(msg)
    }
}

impl SyncError {
    /// Worth retrying the same request (the link, not the content, failed).
    pub fn is_transient(&self) -> bool {
        matches!(self, SyncError::Transport(_) | SyncError::Truncated)
            || matches!(self, SyncError::Hub { status, .. } if *status >= 500)
    }
}

pub type Result<T> = std::result::Result<T, SyncError>;
