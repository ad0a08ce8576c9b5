//! The crate's single error type.
//!
//! The simulator is test infrastructure, but it still must not panic on
//! anything that can fail at run time (spawning etcd, binding sockets,
//! generating certificates): a panic inside a background task would be
//! swallowed and turn a clear failure into a confusing hang.

use std::path::PathBuf;

/// Everything that can go wrong while starting, driving or stopping a [`crate::SimCluster`].
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A local I/O operation (socket, file, process) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The etcd binary could not be started.
    #[error("cannot start etcd member {member} ({binary}): {source}")]
    EtcdSpawn {
        member: String,
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An etcd member exited or did not become healthy in time.
    #[error("etcd member {member} is not healthy: {reason}; last log lines:\n{log_tail}")]
    EtcdUnhealthy {
        member: String,
        reason: String,
        log_tail: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    /// The TLS configuration was rejected.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// JSON (de)serialisation of a Kubernetes object failed.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
    /// Randomness was unavailable.
    #[error("random number generator failed: {0}")]
    Random(String),
    /// The named pod is not part of this simulated cluster.
    #[error("no such pod: {0}")]
    NoSuchPod(String),
    /// An etcd membership change or member list failed.
    #[error("etcd {action} failed: {reason}")]
    Membership { action: String, reason: String },
    /// The configuration cannot describe a cluster.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl SimError {
    /// Wraps an I/O error with a short description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SimError::Io {
            context: context.into(),
            source,
        }
    }
}
