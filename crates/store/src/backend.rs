//! Where pack files live.
//!
//! The store needs very little from its storage: put a finished pack under a name,
//! read a byte range of one, list them, delete one. That is exactly what an object
//! store offers (PUT, ranged GET, LIST, DELETE), so an S3-compatible backend can sit
//! behind the same trait; [`LocalDir`] is the embedded default.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{IoContext, Result, StoreError};

pub trait Backend: Send + Sync {
    /// Make the finished, fsynced temporary file at `tmp` durable as pack `name`.
    /// When this returns, the pack survives a crash. The temporary file is consumed.
    fn put_pack(&self, name: &str, tmp: &Path) -> Result<()>;
    /// Read `len` bytes at `offset` of pack `name`. A missing pack is an `Io` error
    /// of kind `NotFound` (gc may have moved its objects; the caller looks again).
    fn read_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>>;
    /// Size in bytes of pack `name`.
    fn pack_size(&self, name: &str) -> Result<u64>;
    /// Names of every pack present.
    fn list_packs(&self) -> Result<Vec<String>>;
    /// Remove pack `name`; removing a missing pack is not an error.
    fn delete_pack(&self, name: &str) -> Result<()>;
    /// A human-readable location of pack `name`, for error messages.
    fn describe(&self, name: &str) -> String;
}

/// Packs as files in a local directory, fanned out by the first two hex digits so no
/// directory grows past a few thousand entries.
pub struct LocalDir {
    root: PathBuf,
    /// Open file handles, so a sequential read of a pack does not reopen it per object.
    /// Bounded; an unlinked pack stays readable through a cached handle, which is
    /// harmless because every object read is checked against its hash.
    open: Mutex<HashMap<String, Arc<File>>>,
}

const MAX_OPEN: usize = 64;

impl LocalDir {
    pub fn new(root: PathBuf) -> LocalDir {
        LocalDir {
            root,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn pack_path(&self, name: &str) -> PathBuf {
        let fan = name.get(0..2).unwrap_or("00");
        self.root.join(fan).join(format!("{name}.pack"))
    }

    fn file(&self, name: &str) -> Result<Arc<File>> {
        let mut open = self.open.lock().unwrap();
        if let Some(f) = open.get(name) {
            return Ok(f.clone());
        }
        let path = self.pack_path(name);
        let f = Arc::new(File::open(&path).at(&path)?);
        if open.len() >= MAX_OPEN {
            open.clear();
        }
        open.insert(name.to_string(), f.clone());
        Ok(f)
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

impl Backend for LocalDir {
    fn put_pack(&self, name: &str, tmp: &Path) -> Result<()> {
        let dest = self.pack_path(name);
        let dir = dest.parent().expect("pack path has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir).at(dir)?;
            fsync_dir(&self.root)?;
        }
        std::fs::rename(tmp, &dest).at(&dest)?;
        // The rename is only durable once the directory entry is.
        fsync_dir(dir)
    }

    fn read_range(&self, name: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.file(name)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).map_err(|source| {
            let path = self.pack_path(name);
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::BadPack {
                    pack: path.display().to_string(),
                    reason: format!("truncated: cannot read {len} bytes at offset {offset}"),
                }
            } else {
                StoreError::Io { path, source }
            }
        })?;
        Ok(buf)
    }

    fn pack_size(&self, name: &str) -> Result<u64> {
        let path = self.pack_path(name);
        Ok(std::fs::metadata(&path).at(&path)?.len())
    }

    fn list_packs(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let fans = match std::fs::read_dir(&self.root) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).at(&self.root),
        };
        for fan in fans {
            let fan = fan.at(&self.root)?;
            if !fan.file_type().at(fan.path())?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(fan.path()).at(fan.path())? {
                let f = f.at(fan.path())?;
                let n = f.file_name();
                let n = n.to_string_lossy();
                if let Some(stem) = n.strip_suffix(".pack") {
                    out.push(stem.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete_pack(&self, name: &str) -> Result<()> {
        self.open.lock().unwrap().remove(name);
        let path = self.pack_path(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).at(&path),
        }
    }

    fn describe(&self, name: &str) -> String {
        self.pack_path(name).display().to_string()
    }
}
