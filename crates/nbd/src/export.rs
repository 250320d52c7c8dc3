//! What the server serves: exports, named and resolved by an [`ExportProvider`].

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use strata_block::Disk;

/// One entry of an export listing (`NBD_OPT_LIST`, `nbdinfo --list`, `qemu-nbd -L`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    /// Free text shown to people; may be empty.
    pub description: String,
}

/// An opened export: the disk to serve and what to tell clients about it.
#[derive(Clone)]
pub struct Export {
    pub disk: Arc<dyn Disk>,
    /// The export's canonical name, sent as `NBD_INFO_NAME` when a client asks (e.g.
    /// `debian@main` resolved to `debian@3fa4c1d2`). `None`: the name the client used.
    pub canonical_name: Option<String>,
    /// Sent as `NBD_INFO_DESCRIPTION` when a client asks; empty sends nothing.
    pub description: String,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: every connection that opens this name gets
    /// the same disk object (or disks that share all state), so a flush on one
    /// connection covers writes made on another. True unless set otherwise.
    pub multi_conn: bool,
    /// Held for as long as a connection uses this export and dropped when it ends, so
    /// a provider can count its clients (`strata session ls`). Clones share it.
    pub lease: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Export {
    pub fn new(disk: Arc<dyn Disk>) -> Export {
        Export {
            disk,
            canonical_name: None,
            description: String::new(),
            multi_conn: true,
            lease: None,
        }
    }

    /// Attach a value dropped when the last connection using this opening ends.
    pub fn with_lease(mut self, lease: Arc<dyn std::any::Any + Send + Sync>) -> Export {
        self.lease = Some(lease);
        self
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.description = description.into();
        self
    }

    pub fn with_canonical_name(mut self, name: impl Into<String>) -> Export {
        self.canonical_name = Some(name.into());
        self
    }
}

/// Where exports come from. Called from a blocking thread pool (opening may read a
/// store), once per `NBD_OPT_INFO`/`NBD_OPT_GO`/`NBD_OPT_EXPORT_NAME`/meta-context
/// option naming an export not yet opened on that connection.
pub trait ExportProvider: Send + Sync + 'static {
    /// The exports to list. Names that [`open`](Self::open) resolves dynamically
    /// (`IMAGE@REV`) need not all be listed.
    fn list(&self) -> Vec<ExportInfo>;

    /// Open the export a client names (`""` is the default export). An error of kind
    /// `NotFound` is reported as an unknown export, `PermissionDenied` as refused by
    /// policy, anything else as unknown with the error's text; with
    /// `NBD_OPT_EXPORT_NAME`, which cannot carry errors, the connection is closed.
    ///
    /// Writable exports should hand every connection the same disk object, so that
    /// `NBD_FLAG_CAN_MULTI_CONN` holds (see [`Export::multi_conn`]).
    fn open(&self, name: &str) -> io::Result<Export>;
}

/// A fixed set of exports, each one shared disk: the simplest provider.
#[derive(Clone, Default)]
pub struct StaticExports {
    exports: BTreeMap<String, (Arc<dyn Disk>, String)>,
    default: Option<String>,
}

impl StaticExports {
    pub fn new() -> StaticExports {
        StaticExports::default()
    }

    /// Add (or replace) an export.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        disk: Arc<dyn Disk>,
        description: impl Into<String>,
    ) -> &mut Self {
        self.exports.insert(name.into(), (disk, description.into()));
        self
    }

    /// The export that the empty name (the "default export") opens.
    pub fn set_default(&mut self, name: impl Into<String>) -> &mut Self {
        self.default = Some(name.into());
        self
    }
}

impl ExportProvider for StaticExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .iter()
            .map(|(name, (_, description))| ExportInfo {
                name: name.clone(),
                description: description.clone(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> io::Result<Export> {
        let (key, canonical) = match (name, &self.default) {
            ("", Some(default)) => (default.as_str(), Some(default.clone())),
            _ => (name, None),
        };
        match self.exports.get(key) {
            Some((disk, description)) => Ok(Export {
                disk: disk.clone(),
                canonical_name: canonical,
                description: description.clone(),
                multi_conn: true,
                lease: None,
            }),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no export named {name:?}"),
            )),
        }
    }
}
