//! `strata serve`: the store's versions (read-only) and disk sessions (writable) over
//! NBD, plus a control socket through which `strata session commit|reset` reach a
//! session that this process holds open.
//!
//! Export names: a session's name serves that session; `IMAGE@REV` (or `IMAGE`,
//! `IMAGE:BRANCH`) serves that version read-only. Every connection to one name shares
//! one disk object, so NBD multi-conn holds.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use strata_block::{BlockCacheConfig, Disk, SessionDisk, VersionDisk, VersionDisks};
use strata_nbd::{Export, ExportInfo, ExportProvider, Listener, Server, ServerConfig};
use strata_store::{Store, VersionId};

use crate::spec::rev_spec;

/// Where the sessions' copy-on-write deltas live.
pub fn session_dir(store: &Store, name: &str) -> PathBuf {
    store.root().join("disk-sessions").join(name)
}

/// The control socket of a running `strata serve`.
pub fn control_path(store: &Store) -> PathBuf {
    store.root().join("serve.sock")
}

/// Resolves export names against the store; keeps opened disks shared.
pub struct StoreExports {
    store: Arc<Store>,
    /// What the empty export name opens (clients started by `nbdcopy [ CMD ]` and
    /// other socket-activation users ask for "").
    default: Option<String>,
    sessions: Mutex<HashMap<String, Arc<SessionDisk>>>,
    versions: Mutex<HashMap<VersionId, Arc<VersionDisk>>>,
    /// One disk (and block cache) per version for the sessions' bases and the
    /// read-only exports alike: VMs whose sessions share a gold base share its cache.
    bases: Arc<VersionDisks>,
    /// Connected clients per export name (sessions by name, versions as IMAGE@ID).
    clients: Arc<Mutex<HashMap<String, usize>>>,
}

/// One client's hold on an export, counted in [`StoreExports::clients`] while alive.
struct ClientLease {
    name: String,
    clients: Arc<Mutex<HashMap<String, usize>>>,
}

impl ClientLease {
    fn new(name: &str, clients: &Arc<Mutex<HashMap<String, usize>>>) -> Arc<ClientLease> {
        *clients.lock().unwrap().entry(name.to_string()).or_default() += 1;
        Arc::new(ClientLease {
            name: name.to_string(),
            clients: clients.clone(),
        })
    }
}

impl Drop for ClientLease {
    fn drop(&mut self) {
        let mut clients = self.clients.lock().unwrap();
        if let Some(n) = clients.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.name);
            }
        }
    }
}

impl StoreExports {
    pub fn new(
        store: Arc<Store>,
        default: Option<String>,
        cache: BlockCacheConfig,
    ) -> StoreExports {
        StoreExports {
            bases: VersionDisks::with_config(store.clone(), cache),
            store,
            default,
            sessions: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
            clients: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Serve `disk` as session `name`, which the catalog may not list yet (a point's
    /// session whose base is still being streamed from its hub).
    pub fn adopt_session(&self, name: &str, disk: Arc<SessionDisk>) {
        self.sessions.lock().unwrap().insert(name.to_string(), disk);
    }

    /// Stop serving session `name` to new connections (so it can be removed or
    /// replaced); unless `force`, refused while a client is connected to it. With
    /// `force`, connected clients keep their open disk, but detached
    /// ([`SessionDisk::detach`]): every further request of theirs fails with EIO, so
    /// no write is acknowledged into a delta that is about to be removed, and the
    /// directory is free to remove. True if it was open.
    pub fn release_session(&self, name: &str, force: bool) -> Result<bool> {
        if let Some(n) = self.clients.lock().unwrap().get(name).filter(|_| !force) {
            anyhow::bail!("session {name} has {n} connected client(s); stop the VM first");
        }
        let Some(disk) = self.sessions.lock().unwrap().remove(name) else {
            return Ok(false);
        };
        if force {
            // Detached even if the flush fails (the lock is given up either way).
            if let Err(e) = disk.detach() {
                tracing::warn!(session = %name, error = %e, "flushing a released session failed");
            }
        }
        Ok(true)
    }

    /// Seal the open session `name` ([`SessionDisk::seal`]): its clients' further
    /// requests fail, what they were told is written stays for a last commit (through
    /// [`StoreExports::session`], which still returns it). False if it is not open.
    pub fn seal_session(&self, name: &str) -> Result<bool> {
        let disk = self.sessions.lock().unwrap().get(name).cloned();
        match disk {
            Some(d) => {
                d.seal()
                    .with_context(|| format!("flushing sealed session {name}"))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The open session `name`, opening it on first use.
    pub fn session(&self, name: &str) -> Result<Arc<SessionDisk>> {
        let mut open = self.sessions.lock().unwrap();
        if let Some(s) = open.get(name) {
            return Ok(s.clone());
        }
        let info = self.store.disk_session(name)?;
        let disk = Arc::new(SessionDisk::open_shared(
            &session_dir(&self.store, name),
            &self.bases,
        )?);
        reconcile_base(&self.store, &info.name, &info.base, &disk)?;
        open.insert(name.to_string(), disk.clone());
        Ok(disk)
    }

    fn version(&self, spec: &str) -> Result<(VersionId, Arc<VersionDisk>)> {
        let s = rev_spec(spec)?;
        let id = self.store.resolve(&s.image, s.rev.as_deref())?;
        let mut open = self.versions.lock().unwrap();
        let disk = match open.get(&id) {
            Some(d) => d.clone(),
            None => {
                let d = self.bases.get(id)?;
                open.insert(id, d.clone());
                d
            }
        };
        Ok((id, disk))
    }
}

/// A crash between a commit and recording the session's new base leaves the catalog
/// one step behind the session: catch up.
pub fn reconcile_base(store: &Store, name: &str, recorded: &str, disk: &SessionDisk) -> Result<()> {
    if disk.base().to_hex() != recorded {
        store.set_disk_session_base(name, &disk.base())?;
    }
    Ok(())
}

fn not_found(e: anyhow::Error) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{e:#}"))
}

impl ExportProvider for StoreExports {
    fn list(&self) -> Vec<ExportInfo> {
        let mut out = Vec::new();
        for s in self.store.disk_sessions().unwrap_or_default() {
            out.push(ExportInfo {
                description: format!("session over {}@{}", s.image, &s.base[..12]),
                name: s.name,
            });
        }
        for img in self.store.images().unwrap_or_default() {
            for b in img.branches {
                out.push(ExportInfo {
                    name: format!("{}@{}", img.name, b.name),
                    description: format!("read-only, version {}", &b.version[..12]),
                });
            }
        }
        out
    }

    fn open(&self, name: &str) -> io::Result<Export> {
        let name = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            ("", None) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no default export (start strata serve with --default-export)",
                ))
            }
            (n, _) => n,
        };
        let is_session = self.sessions.lock().unwrap().contains_key(name)
            || self
                .store
                .disk_sessions()
                .map_err(io::Error::other)?
                .iter()
                .any(|s| s.name == name);
        if is_session {
            let disk = self
                .session(name)
                .map_err(|e| io::Error::other(format!("{e:#}")))?;
            if disk.is_sealed() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("session {name} was released (its desktop is checked out elsewhere)"),
                ));
            }
            let base = disk.base();
            return Ok(Export::new(disk as Arc<dyn Disk>)
                .with_description(format!("session over version {}", base.short()))
                .with_lease(ClientLease::new(name, &self.clients)));
        }
        let (id, disk) = self.version(name).map_err(not_found)?;
        let canonical = format!(
            "{}@{}",
            rev_spec(name).map_err(not_found)?.image,
            id.short()
        );
        Ok(Export::new(disk as Arc<dyn Disk>)
            .with_description(format!("read-only version {}", id.short()))
            .with_lease(ClientLease::new(&canonical, &self.clients))
            .with_canonical_name(canonical))
    }
}

/// A request on the control socket (one JSON object per line, one reply line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Control {
    Commit {
        session: String,
        message: String,
        branch: Option<String>,
        author: String,
    },
    Reset {
        session: String,
    },
    /// Connected clients per export.
    Clients,
    /// Refuse every further request of the session's clients (a point that lost the
    /// desktop the session belongs to, before its last commit); see
    /// [`StoreExports::seal_session`].
    Seal {
        session: String,
    },
}

/// Run a control request against sessions held by `exports`.
pub fn handle_control(exports: &StoreExports, req: Control) -> Result<serde_json::Value> {
    match req {
        Control::Commit {
            session,
            message,
            branch,
            author,
        } => {
            let disk = exports.session(&session)?;
            let r =
                crate::session::commit(&exports.store, &session, &disk, &message, branch, &author)?;
            Ok(serde_json::to_value(r)?)
        }
        Control::Reset { session } => {
            exports.session(&session)?.reset()?;
            Ok(serde_json::json!({"session": session, "reset": true}))
        }
        Control::Clients => {
            let clients = exports.clients.lock().unwrap().clone();
            Ok(serde_json::json!({ "clients": clients }))
        }
        Control::Seal { session } => {
            let sealed = exports.seal_session(&session)?;
            Ok(serde_json::json!({"session": session, "sealed": sealed}))
        }
    }
}

/// Send a request to a running server; `Ok(None)` if no server is listening.
pub fn send_control(store: &Store, req: &Control) -> Result<Option<serde_json::Value>> {
    let path = control_path(store);
    let mut stream = match StdUnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).context("reading the reply of strata serve")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    Ok(Some(v))
}

fn control_loop(listener: StdUnixListener, exports: Arc<StoreExports>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let exports = exports.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(&conn);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                return;
            }
            let reply = match serde_json::from_str::<Control>(&line) {
                Ok(req) => match handle_control(&exports, req) {
                    Ok(v) => v,
                    Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                },
                Err(e) => serde_json::json!({"error": format!("bad control request: {e}")}),
            };
            let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
        });
    }
}

pub struct ServeArgs {
    pub default_export: Option<String>,
    /// The block cache of the versions served.
    pub cache: BlockCacheConfig,
    pub listen: Vec<String>,
    pub sockets: Vec<PathBuf>,
    pub tls_dir: Option<PathBuf>,
    pub tls_required: bool,
}

/// Serve until SIGINT/SIGTERM.
pub fn serve(store: Arc<Store>, args: ServeArgs, json: bool) -> Result<()> {
    let exports = Arc::new(StoreExports::new(
        store.clone(),
        args.default_export.clone(),
        args.cache.clone(),
    ));
    serve_exports(store, exports, args, json)
}

/// [`serve`] over exports the caller made (`strata point run` shares them with its
/// sync loop, which commits the sessions they hold open).
pub fn serve_exports(
    store: Arc<Store>,
    exports: Arc<StoreExports>,
    args: ServeArgs,
    json: bool,
) -> Result<()> {
    let control = control_path(&store);
    if StdUnixStream::connect(&control).is_ok() {
        bail!(
            "another strata serve is running on this store ({} answers)",
            control.display()
        );
    }
    let _ = std::fs::remove_file(&control);
    let control_listener = StdUnixListener::bind(&control)
        .with_context(|| format!("binding {}", control.display()))?;
    {
        let exports = exports.clone();
        std::thread::spawn(move || control_loop(control_listener, exports));
    }
    let tls = match &args.tls_dir {
        Some(dir) => Some(strata_nbd::load_tls_dir(dir, false)?),
        None => None,
    };
    if args.tls_required && tls.is_none() {
        bail!("--tls-required needs --tls-dir");
    }
    let config = ServerConfig {
        tls,
        tls_required: args.tls_required,
        ..ServerConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(async {
        let mut listeners = Vec::new();
        for addr in &args.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            listeners.push(Listener::Tcp(l));
        }
        for path in &args.sockets {
            let _ = std::fs::remove_file(path);
            let l = tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?;
            listeners.push(Listener::Unix(l));
        }
        if listeners.is_empty() {
            listeners = strata_nbd::systemd_listeners()?;
        }
        if listeners.is_empty() {
            let l = tokio::net::TcpListener::bind("127.0.0.1:10809")
                .await
                .context("listening on 127.0.0.1:10809")?;
            listeners.push(Listener::Tcp(l));
        }
        let described: Vec<String> = listeners.iter().map(|l| l.describe()).collect();
        if json {
            crate::output::print_json(
                &serde_json::json!({"listening": described, "control": control}),
            );
        } else {
            println!(
                "serving {} on {}",
                store.root().display(),
                described.join(", ")
            );
        }
        let _ = io::stdout().flush();
        let server = Arc::new(Server::new(exports.clone(), config)?);
        let s2 = server.clone();
        tokio::spawn(async move {
            let _ = strata_nbd::shutdown_signal().await;
            s2.shutdown();
        });
        server.serve_all(listeners).await?;
        anyhow::Ok(())
    });
    let _ = std::fs::remove_file(&control);
    // The connections' tasks hold their disks: gone with the runtime. Then close the
    // sessions here (closing flushes them), although the control thread, blocked on
    // its socket, still holds `exports`: the caller may open them next (`hub desktop
    // serve --writable` commits its user session when serving ends).
    drop(rt);
    exports.sessions.lock().unwrap().clear();
    drop(exports);
    result
}
