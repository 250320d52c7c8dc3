//! The fixed newstyle handshake: greeting, option haggling, STARTTLS.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use crate::export::Export;
use crate::proto::*;
use crate::server::Inner;
use crate::stream::MaybeTls;

/// What negotiation ends with when the client enters transmission.
pub(crate) struct Negotiated<S> {
    pub stream: MaybeTls<S>,
    pub export: Export,
    pub structured: bool,
    /// `base:allocation` was selected for the export that was entered.
    pub allocation_context: bool,
}

#[derive(Default)]
struct State {
    structured: bool,
    /// The export name of the last successful `NBD_OPT_SET_META_CONTEXT`, when it
    /// selected `base:allocation`.
    meta_export: Option<String>,
    /// The export opened last on this connection, reused by a later option naming it.
    opened: Option<(String, Export)>,
}

fn proto_err(e: ProtoError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The size and transmission flags an export is announced with.
fn announce(export: &Export, structured: bool) -> (u64, u16) {
    let disk = &export.disk;
    let flags = transmission_flags(ExportCaps {
        read_only: disk.read_only(),
        multi_conn: export.multi_conn,
        structured,
    });
    (disk.size(), flags)
}

/// Open an export through the provider on a blocking thread, or reuse the one this
/// connection opened last under the same name. Errors come as an option reply type
/// and message.
async fn open_export(
    inner: &Arc<Inner>,
    st: &mut State,
    name: &str,
) -> Result<Export, (u32, String)> {
    if let Some((n, e)) = &st.opened {
        if n == name {
            return Ok(e.clone());
        }
    }
    let provider = inner.provider.clone();
    let owned = name.to_owned();
    let result = tokio::task::spawn_blocking(move || provider.open(&owned)).await;
    match result {
        Ok(Ok(export)) => {
            st.opened = Some((name.to_owned(), export.clone()));
            Ok(export)
        }
        Ok(Err(e)) => {
            let rep = match e.kind() {
                io::ErrorKind::PermissionDenied => REP_ERR_POLICY,
                _ => REP_ERR_UNKNOWN,
            };
            Err((rep, e.to_string()))
        }
        Err(_) => Err((REP_ERR_UNKNOWN, format!("opening export {name:?} failed"))),
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut MaybeTls<S>,
    bytes: &[u8],
) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Run the handshake. `Ok(None)`: the client aborted, or was refused in a way that
/// ends the connection; errors are I/O errors or protocol violations (both end it).
pub(crate) async fn negotiate<S>(
    inner: &Arc<Inner>,
    stream: S,
    shutdown: &mut watch::Receiver<bool>,
) -> io::Result<Option<Negotiated<S>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut stream = MaybeTls::Plain(stream);
    send(&mut stream, &server_greeting()).await?;
    let mut raw = [0u8; 4];
    stream.read_exact(&mut raw).await?;
    let client = parse_client_flags(raw).map_err(proto_err)?;
    let mut st = State::default();

    loop {
        let mut hdr = [0u8; OPTION_HEADER_LEN];
        tokio::select! {
            r = stream.read_exact(&mut hdr) => { r?; }
            _ = shutdown.wait_for(|v| *v) => return Ok(None),
        }
        let header = parse_option_header(&hdr).map_err(proto_err)?;
        let mut data = vec![0u8; header.len as usize];
        stream.read_exact(&mut data).await?;
        let opt = header.option;
        let parsed = parse_option(opt, &data);
        drop(data);
        debug!(option = opt, "nbd option");

        let reply = |rep: u32, data: &[u8]| option_reply(opt, rep, data);

        if *shutdown.borrow() && !matches!(parsed, Ok(ClientOption::Abort)) {
            if matches!(parsed, Ok(ClientOption::ExportName(_))) {
                return Ok(None);
            }
            send(
                &mut stream,
                &reply(REP_ERR_SHUTDOWN, b"server shutting down"),
            )
            .await?;
            continue;
        }
        if inner.config.tls_required && !stream.is_tls() {
            match opt {
                OPT_STARTTLS | OPT_ABORT => {}
                // It cannot be refused with an error: the only answer is to hang up.
                OPT_EXPORT_NAME => return Ok(None),
                _ => {
                    send(&mut stream, &reply(REP_ERR_TLS_REQD, b"TLS is required")).await?;
                    continue;
                }
            }
        }

        let option = match parsed {
            Ok(o) => o,
            Err(e) => {
                send(&mut stream, &reply(REP_ERR_INVALID, e.message.as_bytes())).await?;
                continue;
            }
        };
        match option {
            ClientOption::Unknown(_) => {
                send(&mut stream, &reply(REP_ERR_UNSUP, b"option not supported")).await?;
            }
            ClientOption::Abort => {
                // The client may already be gone: errors don't matter any more.
                let _ = send(&mut stream, &reply(REP_ACK, &[])).await;
                let _ = stream.shutdown().await;
                return Ok(None);
            }
            ClientOption::List => {
                let provider = inner.provider.clone();
                let list = tokio::task::spawn_blocking(move || provider.list())
                    .await
                    .unwrap_or_default();
                let mut out = Vec::new();
                for e in &list {
                    out.extend(reply(REP_SERVER, &rep_server_data(&e.name, &e.description)));
                }
                out.extend(reply(REP_ACK, &[]));
                send(&mut stream, &out).await?;
            }
            ClientOption::StartTls => {
                let acceptor = match &inner.tls_acceptor {
                    Some(a) if client.fixed_newstyle => a.clone(),
                    _ => {
                        send(&mut stream, &reply(REP_ERR_UNSUP, b"TLS is not configured")).await?;
                        continue;
                    }
                };
                if stream.is_tls() {
                    send(
                        &mut stream,
                        &reply(REP_ERR_INVALID, b"TLS already negotiated"),
                    )
                    .await?;
                    continue;
                }
                send(&mut stream, &reply(REP_ACK, &[])).await?;
                stream = match stream {
                    MaybeTls::Plain(s) => MaybeTls::Tls(Box::new(acceptor.accept(s).await?)),
                    tls @ MaybeTls::Tls(_) => tls,
                };
                // Nothing negotiated in the clear survives the upgrade.
                st = State::default();
            }
            ClientOption::StructuredReply => {
                st.structured = true;
                send(&mut stream, &reply(REP_ACK, &[])).await?;
            }
            ClientOption::ListMetaContext(m) | ClientOption::SetMetaContext(m) => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, even when it fails.
                    st.meta_export = None;
                }
                if !st.structured {
                    let msg = b"structured replies must be negotiated first";
                    send(&mut stream, &reply(REP_ERR_INVALID, msg)).await?;
                    continue;
                }
                let matched = match match_meta_queries(&m.queries, !set) {
                    Ok(m) => m,
                    Err(e) => {
                        send(&mut stream, &reply(REP_ERR_INVALID, e.message.as_bytes())).await?;
                        continue;
                    }
                };
                if let Err((rep, msg)) = open_export(inner, &mut st, &m.export).await {
                    send(&mut stream, &reply(rep, msg.as_bytes())).await?;
                    continue;
                }
                let mut out = Vec::new();
                if matched {
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    out.extend(reply(
                        REP_META_CONTEXT,
                        &rep_meta_context_data(id, META_BASE_ALLOCATION),
                    ));
                    if set {
                        st.meta_export = Some(m.export.clone());
                    }
                }
                out.extend(reply(REP_ACK, &[]));
                send(&mut stream, &out).await?;
            }
            ClientOption::Info(r) | ClientOption::Go(r) => {
                let export = match open_export(inner, &mut st, &r.name).await {
                    Ok(e) => e,
                    Err((rep, msg)) => {
                        send(&mut stream, &reply(rep, msg.as_bytes())).await?;
                        continue;
                    }
                };
                let (size, flags) = announce(&export, st.structured);
                let mut out = reply(REP_INFO, &info_export(size, flags));
                if r.wants(INFO_NAME) {
                    let name = export.canonical_name.as_deref().unwrap_or(&r.name);
                    out.extend(reply(REP_INFO, &info_string(INFO_NAME, name)));
                }
                if r.wants(INFO_DESCRIPTION) && !export.description.is_empty() {
                    let d = &export.description;
                    out.extend(reply(REP_INFO, &info_string(INFO_DESCRIPTION, d)));
                }
                // Sent whether asked for or not (clients ignore what they did not ask
                // for); these are the protocol's default constraints anyway.
                let sizes = BlockSizes::for_disk(export.disk.block_size());
                out.extend(reply(REP_INFO, &sizes.encode()));
                out.extend(reply(REP_ACK, &[]));
                send(&mut stream, &out).await?;
                if opt == OPT_GO {
                    let allocation_context = st.meta_export.as_deref() == Some(r.name.as_str());
                    return Ok(Some(Negotiated {
                        stream,
                        export,
                        structured: st.structured,
                        allocation_context,
                    }));
                }
            }
            ClientOption::ExportName(name) => {
                let export = match open_export(inner, &mut st, &name).await {
                    Ok(e) => e,
                    Err((_, msg)) => {
                        debug!("NBD_OPT_EXPORT_NAME {name:?} refused: {msg}");
                        return Ok(None);
                    }
                };
                let (size, flags) = announce(&export, st.structured);
                send(
                    &mut stream,
                    &export_name_reply(size, flags, client.no_zeroes),
                )
                .await?;
                let allocation_context = st.meta_export.as_deref() == Some(name.as_str());
                return Ok(Some(Negotiated {
                    stream,
                    export,
                    structured: st.structured,
                    allocation_context,
                }));
            }
        }
    }
}
