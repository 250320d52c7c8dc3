//! # strata-nbd: a Network Block Device server
//!
//! Serves [`strata_block::Disk`]s to NBD clients (qemu, libnbd's tools, the Linux
//! kernel's `nbd-client`) over TCP and Unix sockets, optionally with TLS. The protocol
//! half of `strata serve`: the caller decides which exports exist through an
//! [`ExportProvider`], and runs a [`Server`] on a tokio runtime.
//!
//! What it speaks: the fixed newstyle handshake (with `NBD_FLAG_NO_ZEROES`); options
//! `NBD_OPT_GO`/`INFO` (export, name, description and block size information),
//! `LIST`, `EXPORT_NAME`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation`), `STARTTLS`; commands READ (simple or
//! structured replies, split into data and hole chunks by the disk's extents, `DF`
//! honoured), WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO), CACHE,
//! BLOCK_STATUS (`REQ_ONE`) and DISC. Requests are pipelined: read continuously,
//! carried out concurrently on blocking threads, answered out of order, with a
//! per-connection bound on requests and bytes in flight.
//!
//! ```no_run
//! use std::sync::Arc;
//! use strata_nbd::{mem::MemDisk, Server, ServerConfig, StaticExports};
//!
//! # async fn run() -> std::io::Result<()> {
//! let mut exports = StaticExports::new();
//! exports.add("scratch", Arc::new(MemDisk::new(1 << 30, 4096)), "an empty disk");
//! let server = Server::new(Arc::new(exports), ServerConfig::default())?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! let unix = tokio::net::UnixListener::bind("/tmp/nbd.sock")?;
//! let stopper = server.clone();
//! tokio::spawn(async move {
//!     let _ = strata_nbd::shutdown_signal().await;
//!     stopper.shutdown();
//! });
//! server.serve_all(vec![tcp.into(), unix.into()]).await?;
//! server.wait_idle().await;
//! # Ok(())
//! # }
//! ```

mod export;
mod handshake;
pub mod mem;
pub mod proto;
mod server;
mod stream;
mod tls;
mod transmit;

pub use export::{Export, ExportInfo, ExportProvider, StaticExports};
pub use server::{
    listeners_from_fds, parse_listen_env, shutdown_signal, systemd_listeners, Listener, Server,
    ServerConfig, ServerStats, SD_LISTEN_FDS_START,
};
pub use tls::{load_tls_config, load_tls_dir};

/// Re-exported for callers that build their own TLS configuration.
pub use rustls;

/// Everything the `nbd_session` fuzz target checks: `data` is the whole byte stream a
/// client sends (greeting reply, options, requests, payloads); it is served from a
/// small writable disk over an in-memory pipe, and whatever it holds, the server must
/// answer and end the connection without panicking or hanging. Returns what the
/// server sent.
#[doc(hidden)]
pub fn fuzz_session(data: &[u8]) -> Vec<u8> {
    use strata_block::Disk;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let disk = mem::MemDisk::new(1 << 20, 4096);
    disk.fill(&[0x5a; 8192], 4096);
    let mut exports = StaticExports::new();
    exports.add(
        "",
        std::sync::Arc::new(disk) as std::sync::Arc<dyn Disk>,
        "fuzz",
    );
    let ro = mem::MemDisk::new(65536, 512).read_only(true);
    exports.add(
        "ro",
        std::sync::Arc::new(ro) as std::sync::Arc<dyn Disk>,
        "",
    );
    let config = ServerConfig {
        handshake_timeout: None,
        ..ServerConfig::default()
    };
    let server = Server::new(std::sync::Arc::new(exports), config).expect("server");
    let input = data.to_vec();
    rt.block_on(async move {
        let (client, conn) = tokio::io::duplex(64 * 1024);
        let serving = tokio::spawn(async move { server.serve_stream(conn, "fuzz").await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        });
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
        let _ = writer.await;
        serving.await.expect("connection task panicked");
        sink
    })
}
