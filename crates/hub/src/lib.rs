//! # strata-hub: the hub service
//!
//! IT keeps images in a hub in the data centre; points (laptops, branch servers)
//! pull versions from it and push their own. The hub is an HTTP(S) service (axum on
//! hyper, rustls with ring) over a store, plus metadata (points, credentials, grants,
//! image owners, audit log) in an embedded database behind [`db::MetaDb`]. The API
//! (`/v1`, documented in `docs/hub-api.yaml`) moves objects in batched, streaming,
//! zstd-compressed bodies (see `strata_sync::frame`) and moves refs only by
//! compare-and-swap.
//!
//! ```text
//! HUB_DIR/
//!   store/         the hub's store (an ordinary Strata store)
//!   hub.sqlite     metadata (SQLite, WAL)
//!   admin.token    the operators' bearer credential, mode 0600, made by `init`
//!   page-index/    page indexes of versions points pull against (a cache)
//! ```
//!
//! **Access.** A point authenticates with its bearer credential (from enrolment);
//! it may read the images granted to it and the images it owns, and write only the
//! images it owns (it owns an image it creates by pushing). Operators use the admin
//! credential. A missing, wrong or revoked credential gets 401; anything not
//! allowed gets 403. Objects are served by id to a caller allowed to read the image
//! named in the request; ids are unguessable hashes learned from trees the caller
//! can read.
//!
//! **gc safety.** An upload holds a store write session for its whole life (across
//! requests): what it wrote and what its "missing" answers said the hub has stay
//! protected from a concurrent gc until the commit moves a branch to them. An upload
//! left idle for [`HubConfig::upload_idle`] is ended (what it sent stays until the
//! next gc, so a resumed push finds it).
//!
//! **Transport.** Plain HTTP only on a loopback address unless
//! [`HubConfig::insecure`]; otherwise TLS from PEM files, with HTTP/2 (ALPN) so a
//! point's parallel requests share one connection.

mod channels;
mod credentials;
pub mod db;
mod desktops;
pub mod gc;
mod pages;
pub mod retention;
mod routes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use strata_store::{Store, WriteSession};
use tokio::net::TcpListener;

use crate::db::{MetaDb, SqliteMeta};

/// How to run a hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// The hub's directory (see [`init`]).
    pub dir: PathBuf,
    /// Address to listen on; port 0 picks a free one (see [`RunningHub::addr`]).
    pub listen: SocketAddr,
    /// TLS certificate chain and private key (PEM). `None`: plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Allow plain HTTP on a non-loopback address.
    pub insecure: bool,
    /// zstd level of download streams.
    pub level: i32,
    /// An upload with no request for this long is ended.
    pub upload_idle: Duration,
    /// Lifetime of enrolment tokens.
    pub enrollment_ttl: Duration,
    /// Which restore points of desktops' user disks to keep.
    pub retention: retention::Retention,
    /// Run [`gc`](gc::gc) this often; the first run comes an hour after the start
    /// (sooner if the interval is shorter), so a hub restarted more often than the
    /// interval still collects. `None`: only when an operator runs `strata hub gc`.
    pub gc_interval: Option<Duration>,
}

impl HubConfig {
    pub fn new(dir: &Path, listen: SocketAddr) -> HubConfig {
        HubConfig {
            dir: dir.to_path_buf(),
            listen,
            tls: None,
            insecure: false,
            level: strata_sync::frame::DEFAULT_LEVEL,
            upload_idle: Duration::from_secs(15 * 60),
            enrollment_ttl: Duration::from_secs(24 * 3600),
            retention: retention::Retention::default(),
            gc_interval: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// What [`init`] made.
#[derive(Clone, Debug)]
pub struct InitReport {
    pub store: PathBuf,
    pub admin_token_path: PathBuf,
    pub admin_token: String,
}

fn random_secret(prefix: &str) -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source is available");
    format!("{prefix}{}", hex::encode(b))
}

/// Create a hub directory: its store, its metadata database and the admin
/// credential (a file readable by its owner only).
pub fn init(dir: &Path) -> anyhow::Result<InitReport> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if dir.join("store").exists() || dir.join("admin.token").exists() {
        bail!("{} already holds a hub", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let store = dir.join("store");
    Store::init(&store)?;
    SqliteMeta::open(&dir.join("hub.sqlite"))?;
    let token = random_secret("strata-admin-");
    let path = dir.join("admin.token");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| path.display().to_string())?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    Ok(InitReport {
        store,
        admin_token_path: path,
        admin_token: token,
    })
}

/// An upload in progress: a write session kept across requests.
pub(crate) struct Upload {
    pub image: String,
    pub point: String,
    pub session: Option<WriteSession<'static>>,
    pub last_used: Instant,
}

/// The shared state of a running hub.
pub(crate) struct Hub {
    pub store: Arc<Store>,
    pub db: Arc<dyn MetaDb>,
    pub admin: blake3::Hash,
    pub uploads: Mutex<HashMap<String, Arc<Mutex<Upload>>>>,
    pub level: i32,
    pub enrollment_ttl: Duration,
    pub retention: retention::Retention,
    pub pages: Arc<pages::PageIndexes>,
    pub credentials: credentials::CredentialCache,
}

impl Hub {
    fn open(cfg: &HubConfig) -> anyhow::Result<Hub> {
        let dir = &cfg.dir;
        let store = Store::open(&dir.join("store"))
            .with_context(|| format!("{}: not a hub directory (run init)", dir.display()))?;
        let db = SqliteMeta::open(&dir.join("hub.sqlite"))?;
        let token_path = dir.join("admin.token");
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| token_path.display().to_string())?;
        Ok(Hub {
            store: Arc::new(store),
            db: Arc::new(db),
            admin: blake3::hash(token.trim().as_bytes()),
            uploads: Mutex::new(HashMap::new()),
            level: cfg.level,
            enrollment_ttl: cfg.enrollment_ttl,
            retention: cfg.retention.clone(),
            pages: Arc::new(pages::PageIndexes::new(dir)),
            credentials: credentials::CredentialCache::default(),
        })
    }

    /// End uploads idle for longer than `idle`: flush what they received (so a
    /// resumed push finds it) and release their pins.
    fn expire_uploads(&self, idle: Duration) {
        let stale: Vec<Arc<Mutex<Upload>>> = {
            let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, u)| {
                    u.try_lock()
                        .map(|u| u.last_used.elapsed() > idle)
                        .unwrap_or(false)
                })
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| map.remove(k)).collect()
        };
        for u in stale {
            let mut u = u.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(mut s) = u.session.take() {
                let _ = s.flush();
            }
            tracing::info!(image = %u.image, point = %u.point, "upload expired");
        }
    }
}

fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| cert.display().to_string())?
        .collect::<Result<_, _>>()
        .with_context(|| cert.display().to_string())?;
    if certs.is_empty() {
        bail!("{}: no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| key.display().to_string())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A hub serving in the background (tests, or a CLI that wants the address).
pub struct RunningHub {
    addr: SocketAddr,
    tls: bool,
    task: tokio::task::JoinHandle<()>,
    gc_task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningHub {
    /// The address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` or `https://ADDR`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.addr
        )
    }

    /// Stop accepting and drop every open connection.
    pub fn stop(self) {
        self.task.abort();
        if let Some(t) = &self.gc_task {
            t.abort();
        }
    }

    /// Wait until the server ends (it does not, unless it fails).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("hub server task")?;
        Ok(())
    }
}

/// Bind and start serving in the background; returns once the socket is bound.
pub async fn start(cfg: HubConfig) -> anyhow::Result<RunningHub> {
    if cfg.tls.is_none() && !cfg.listen.ip().is_loopback() && !cfg.insecure {
        bail!(
            "refusing to serve plain HTTP on {} (not a loopback address): give a TLS \
             certificate and key (--tls-cert, --tls-key), or pass --insecure if the network is trusted",
            cfg.listen
        );
    }
    let acceptor = match &cfg.tls {
        Some((c, k)) => Some(tokio_rustls::TlsAcceptor::from(load_tls(c, k)?)),
        None => None,
    };
    let hub = Arc::new(Hub::open(&cfg)?);
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let app = routes::router(hub.clone());
    let idle = cfg.upload_idle;
    let tls = acceptor.is_some();
    let gc_task = cfg
        .gc_interval
        .map(|every| tokio::spawn(gc_every(hub.clone(), cfg.dir.clone(), every)));
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(Duration::from_secs(30).min(idle));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let hub = hub.clone();
                    let _ = tokio::task::spawn_blocking(move || hub.expire_uploads(idle)).await;
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let app = app.clone();
                    let acceptor = acceptor.clone();
                    conns.spawn(async move {
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let r = match acceptor {
                            Some(_) if !starts_tls(&stream).await => {
                                refuse_plain_http(stream).await;
                                return;
                            }
                            Some(a) => match a.accept(stream).await {
                                Ok(s) => builder
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), service)
                                    .await,
                                Err(e) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                            },
                            None => builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await,
                        };
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                    });
                }
            }
        }
    });
    Ok(RunningHub {
        addr,
        tls,
        task,
        gc_task,
    })
}

/// Run the hub's [`gc`](gc::gc) every `every`, on a blocking thread. A round that
/// finds another gc running (`strata hub gc`) is skipped.
async fn gc_every(hub: Arc<Hub>, dir: PathBuf, every: Duration) {
    let mut wait = every.min(Duration::from_secs(3600));
    loop {
        tokio::time::sleep(wait).await;
        wait = every;
        let (h, d) = (hub.clone(), dir.clone());
        match tokio::task::spawn_blocking(move || gc::gc(&d, &h.store, &mut |_| {})).await {
            Ok(Ok(r)) => {
                hub.pages.forget_removed();
                tracing::info!(
                    deleted_versions = r.store.deleted_versions,
                    deleted_objects = r.store.deleted_objects,
                    bytes_before = r.store.bytes_before,
                    bytes_after = r.store.bytes_after,
                    page_indexes_removed = r.page_indexes_removed,
                    "gc done"
                )
            }
            Ok(Err(strata_store::StoreError::GcBusy)) => {
                tracing::info!("another gc is running; this round is skipped")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "gc failed"),
            Err(e) => tracing::warn!(error = %e, "gc ended abnormally"),
        }
    }
}

/// Whether a new connection begins with a TLS handshake record (content type 22).
/// Waits for its first byte, as the handshake would.
async fn starts_tls(stream: &tokio::net::TcpStream) -> bool {
    let mut b = [0u8; 1];
    !matches!(stream.peek(&mut b).await, Ok(1) if b[0] != 0x16)
}

/// Answer plain HTTP sent to the HTTPS port in plain HTTP: a TLS alert instead would
/// reach the client as "invalid HTTP version", which says nothing of the cause.
async fn refuse_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = r#"{"code":"bad_request","error":"this hub speaks HTTPS only: plain HTTP was sent to its TLS port (use an https:// URL)"}"#;
    let resp = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Read what the client still sends until it closes (bounded): closing with unread
    // input would reset the connection, and the client could lose the answer.
    let mut sink = [0u8; 16 << 10];
    let drain = async {
        let mut total = 0usize;
        while let Ok(n) = stream.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1 << 20 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Serve until the server fails (the CLI's `strata hub` runs this).
pub async fn serve(cfg: HubConfig) -> anyhow::Result<()> {
    let running = start(cfg).await?;
    tracing::info!(url = %running.url(), "hub listening");
    running.wait().await
}
