//! The server: listeners, connections, limits, graceful shutdown.

use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::export::ExportProvider;
use crate::handshake::negotiate;
use crate::transmit::transmit;

/// How a [`Server`] behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// TLS credentials; `NBD_OPT_STARTTLS` is offered only with them.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` until TLS is up
    /// (the protocol's FORCEDTLS mode). Needs `tls`.
    pub tls_required: bool,
    /// Connections served at once; more are accepted and closed at once.
    pub max_connections: usize,
    /// Requests of one connection in flight (read but not yet answered on the wire).
    pub max_in_flight_requests: usize,
    /// Bytes of payload and reply data one connection may hold in flight (raised to
    /// at least the largest request, 32 MiB and a little).
    pub max_in_flight_bytes: usize,
    /// Time a client has to finish the handshake (`None`: forever).
    pub handshake_timeout: Option<Duration>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            tls: None,
            tls_required: false,
            max_connections: 256,
            max_in_flight_requests: 128,
            max_in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: Some(Duration::from_secs(60)),
        }
    }
}

pub(crate) struct Inner {
    pub provider: Arc<dyn ExportProvider>,
    pub config: ServerConfig,
    pub tls_acceptor: Option<TlsAcceptor>,
    shutdown: watch::Sender<bool>,
    active: watch::Sender<usize>,
    accepted: AtomicU64,
    refused: AtomicU64,
    pub requests: AtomicU64,
}

/// A listening socket the server accepts connections on.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Where it listens, for messages.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp".into(),
            },
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix {}", p.display()),
                    None => "unix (unnamed)".into(),
                },
                Err(_) => "unix".into(),
            },
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Listener {
        Listener::Unix(l)
    }
}

/// Counters of a running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections being served now.
    pub active: usize,
    /// Connections accepted and served since the start.
    pub accepted: u64,
    /// Connections closed at once because `max_connections` were being served.
    pub refused: u64,
    /// Transmission requests read off the wire since the start.
    pub requests: u64,
}

/// An NBD server. Cheap to clone: clones share everything, so one clone can serve
/// while another calls [`shutdown`](Server::shutdown).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

/// Decrements the active count when a connection ends, however it ends.
struct ConnGuard(Arc<Inner>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n -= 1);
    }
}

impl Server {
    /// A server for `provider`'s exports. Fails if `tls_required` is set without TLS
    /// credentials.
    pub fn new(provider: Arc<dyn ExportProvider>, config: ServerConfig) -> io::Result<Server> {
        if config.tls_required && config.tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is required but no TLS credentials were given",
            ));
        }
        let tls_acceptor = config.tls.clone().map(TlsAcceptor::from);
        Ok(Server {
            inner: Arc::new(Inner {
                provider,
                config,
                tls_acceptor,
                shutdown: watch::channel(false).0,
                active: watch::channel(0).0,
                accepted: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                requests: AtomicU64::new(0),
            }),
        })
    }

    /// Accept and serve connections on `listener` until [`shutdown`](Self::shutdown).
    /// Each connection runs in its own task; this returns once shutdown is asked for
    /// (connections may still be finishing: see [`wait_idle`](Self::wait_idle)), or
    /// with the error of a listener that cannot accept any more.
    pub async fn serve(&self, listener: Listener) -> io::Result<()> {
        info!("serving NBD on {}", listener.describe());
        match listener {
            Listener::Tcp(l) => self.serve_tcp(l).await,
            Listener::Unix(l) => self.serve_unix(l).await,
        }
    }

    /// [`serve`](Self::serve) on a TCP listener (TCP_NODELAY is set on connections).
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|v| *v) => return Ok(()),
            };
            match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    self.spawn_connection(stream, addr.to_string());
                }
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// [`serve`](Self::serve) on a Unix socket listener.
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.wait_for(|v| *v) => return Ok(()),
            };
            match accepted {
                Ok((stream, _)) => self.spawn_connection(stream, "unix".to_string()),
                Err(e) => accept_error(e).await?,
            }
        }
    }

    /// Serve on several listeners at once (TCP and Unix, systemd's sockets, ...) until
    /// shutdown; the first listener error ends them all and is returned.
    pub async fn serve_all(&self, listeners: Vec<Listener>) -> io::Result<()> {
        let mut set = JoinSet::new();
        for l in listeners {
            let server = self.clone();
            set.spawn(async move { server.serve(l).await });
        }
        let mut result = Ok(());
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or_else(|e| Err(io::Error::other(e)));
            if r.is_err() && result.is_ok() {
                result = r;
                set.abort_all();
            }
        }
        result
    }

    /// Serve one connection that is already established (a socket handed over by a
    /// supervisor, an inetd-style stdin socket, an in-process pipe). Returns when the
    /// connection ends. Counts toward `max_connections`.
    pub async fn serve_stream<S>(&self, stream: S, peer: &str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self.register() {
            Some(guard) => serve_connection(self.inner.clone(), stream, peer, guard).await,
            None => warn!("refusing NBD connection from {peer}: too many connections"),
        }
    }

    /// Stop accepting connections; connections still negotiating are closed, those
    /// in transmission stop reading requests, finish the ones in flight, send their
    /// replies and close. Returns at once.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Wait until no connection is being served.
    pub async fn wait_idle(&self) {
        let mut rx = self.inner.active.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            active: *self.inner.active.borrow(),
            accepted: self.inner.accepted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
            requests: self.inner.requests.load(Ordering::Relaxed),
        }
    }

    fn register(&self) -> Option<ConnGuard> {
        let max = self.inner.config.max_connections;
        let mut ok = false;
        self.inner.active.send_if_modified(|n| {
            if *n < max {
                *n += 1;
                ok = true;
                true
            } else {
                false
            }
        });
        if ok {
            self.inner.accepted.fetch_add(1, Ordering::Relaxed);
            Some(ConnGuard(self.inner.clone()))
        } else {
            self.inner.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn spawn_connection<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(guard) = self.register() else {
            warn!("refusing NBD connection from {peer}: too many connections");
            return;
        };
        let inner = self.inner.clone();
        tokio::spawn(async move { serve_connection(inner, stream, &peer, guard).await });
    }
}

async fn serve_connection<S>(inner: Arc<Inner>, stream: S, peer: &str, guard: ConnGuard)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    debug!("NBD connection from {peer}");
    let mut shutdown = inner.shutdown.subscribe();
    let handshake = negotiate(&inner, stream, &mut shutdown);
    let negotiated = match inner.config.handshake_timeout {
        Some(t) => match tokio::time::timeout(t, handshake).await {
            Ok(r) => r,
            Err(_) => {
                debug!("{peer}: handshake timed out");
                return;
            }
        },
        None => handshake.await,
    };
    match negotiated {
        Ok(Some(n)) => transmit(inner.clone(), n, shutdown, peer).await,
        Ok(None) => debug!("{peer}: closed during negotiation"),
        Err(e) => debug!("{peer}: negotiation failed: {e}"),
    }
    drop(guard);
}

/// An accept error: transient ones (a connection reset before it was accepted, out
/// of file descriptors) are waited out; others end the listener.
async fn accept_error(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => Ok(()),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
            | Some(libc::EPROTO) | Some(libc::EPERM) => {
                warn!("accepting an NBD connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
            _ => Err(e),
        },
    }
}

/// Wait for SIGINT or SIGTERM (e.g. to call [`Server::shutdown`] then).
pub async fn shutdown_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// systemd socket activation

/// First file descriptor systemd passes.
pub const SD_LISTEN_FDS_START: RawFd = 3;

/// The descriptors `LISTEN_PID`/`LISTEN_FDS` pass to process `pid`: none when the
/// variables are absent, malformed, or meant for another process.
pub fn parse_listen_env(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    pid: u32,
) -> std::ops::Range<RawFd> {
    let none = SD_LISTEN_FDS_START..SD_LISTEN_FDS_START;
    let (Some(p), Some(n)) = (listen_pid, listen_fds) else {
        return none;
    };
    match (p.trim().parse::<u32>(), n.trim().parse::<RawFd>()) {
        (Ok(p), Ok(n)) if p == pid && (0..=4096).contains(&n) => {
            SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n
        }
        _ => none,
    }
}

static SYSTEMD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets systemd passed this process (socket activation), as
/// listeners; empty when the process was not socket-activated. Only the first call
/// takes them (later calls return none), and it must run inside a tokio runtime. The
/// environment variables are left alone: unset them early in `main` if child
/// processes must not see them.
pub fn systemd_listeners() -> io::Result<Vec<Listener>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let range = parse_listen_env(pid.as_deref(), fds.as_deref(), std::process::id());
    if range.is_empty() || SYSTEMD_TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    // SAFETY: systemd hands these descriptors to this process, and the flag above
    // makes sure they are taken over only once.
    unsafe { listeners_from_fds(range) }
}

/// An integer `SOL_SOCKET` option of `fd`.
///
/// # Safety
/// `fd` must be an open descriptor.
unsafe fn socket_int_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the out-parameters are a c_int and its correct size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            &mut value as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Turn listening socket descriptors into listeners, Unix or TCP by their address
/// family. Descriptors that are not listening stream sockets are an error.
///
/// # Safety
/// The descriptors must be open, owned by nobody else in the process, and not used
/// again by the caller: the listeners take ownership and close them.
pub unsafe fn listeners_from_fds(
    fds: impl IntoIterator<Item = RawFd>,
) -> io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    for fd in fds {
        // SAFETY: plain fcntl/getsockopt/getsockname calls on a descriptor the caller
        // vouches for, with correctly sized out-parameters.
        let family = unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            if socket_int_option(fd, libc::SO_TYPE)? != libc::SOCK_STREAM {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("descriptor {fd} is not a stream socket"),
                ));
            }
            if socket_int_option(fd, libc::SO_ACCEPTCONN)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("descriptor {fd} is not a listening socket"),
                ));
            }
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getsockname(fd, &mut addr as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
                return Err(io::Error::last_os_error());
            }
            addr.ss_family as libc::c_int
        };
        let listener = match family {
            libc::AF_UNIX => {
                // SAFETY: ownership of `fd` passes to the listener (see above).
                let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
            libc::AF_INET | libc::AF_INET6 => {
                // SAFETY: as above.
                let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("descriptor {fd} has unsupported address family {other}"),
                ))
            }
        };
        out.push(listener);
    }
    Ok(out)
}
