//! Errors of the store, each carrying enough context to act on.

use std::path::PathBuf;

use crate::id::ChunkId;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog database: {0}")]
    Catalog(#[from] rusqlite::Error),
    #[error("{0} is not a Strata store (no strata.json); run `strata init {0}` first")]
    NotAStore(PathBuf),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} already holds a Strata store")]
    AlreadyExists { path: PathBuf },
    #[error("store at {path} uses format {found}, newer than this build supports ({supported}); upgrade strata")]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("object {id} ({kind}) is missing from the store")]
    MissingObject { id: ChunkId, kind: &'static str },
    #[error("object {id} is damaged: {reason}")]
    Corrupt { id: ChunkId, reason: String },
    #[error("pack {pack}: {reason}")]
    BadPack { pack: String, reason: String },
    #[error("no image named {0:?}")]
    NoSuchImage(String),
    #[error("image {0:?} already exists")]
    ImageExists(String),
    #[error("image {image:?} has no {what} named {name:?}")]
    NoSuchRef {
        image: String,
        what: &'static str,
        name: String,
    },
    #[error("image {image:?} already has a {what} named {name:?}")]
    RefExists {
        image: String,
        what: &'static str,
        name: String,
    },
    #[error("{image}:{branch} moved while this change was being made (expected {expected}, found {found}); nothing was changed, retry against the new tip")]
    RefConflict {
        image: String,
        branch: String,
        expected: String,
        found: String,
    },
    #[error("revision {rev:?} of image {image:?}: {reason}")]
    BadRevision {
        image: String,
        rev: String,
        reason: String,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid block size {0}: must be a power of two from 4 KiB to 4 MiB")]
    InvalidBlockSize(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("another gc is running on this store")]
    GcBusy,
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Attach a path to an io::Error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            path: path.into(),
            source,
        })
    }
}

/// Tree walks report structural problems as strings; they are damage.
impl From<String> for StoreError {
    fn from(reason: String) -> StoreError {
        StoreError::Invalid(format!("damaged block map: {reason}"))
    }
}
