//! [`HubClient`]: the point's side of the hub API, one method per endpoint.
//!
//! * Every object that arrives is verified by hash (in its kind's domain) before it
//!   is returned; damaged or unrequested objects are reported, never handed on.
//! * Bodies stream: a download is decoded frame by frame as bytes arrive, an upload
//!   is compressed once and sent in pieces, both through the optional bandwidth cap.
//! * Connections are reused (HTTP/1.1 keep-alive; HTTP/2 over TLS when the hub offers
//!   it, so parallel requests share one connection); a connection that goes silent
//!   for `read_timeout` fails the request instead of hanging.
//! * Bytes on the wire (request and response bodies) are counted, see
//!   [`HubClient::wire`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode, Url};
use strata_store::{ChunkId, ObjectKind, Store, Version, VersionId};

use crate::api::*;
use crate::error::{Result, SyncError};
use crate::frame::{Body, Frame, FrameReader, FrameWriter, DEFAULT_LEVEL};
use crate::rate::RateLimiter;

/// How to reach a hub.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `https://hub.example:7443` (or `http://127.0.0.1:PORT` on loopback).
    pub url: String,
    /// The point's (or an operator's) bearer credential.
    pub credential: Option<String>,
    /// PEM certificates to trust for `https` (the hub's CA or its self-signed
    /// certificate). No system roots are used: a hub is trusted explicitly.
    pub ca_pem: Option<Vec<u8>>,
    /// Bandwidth cap in bytes per second over all streams of this client.
    pub max_rate: Option<u64>,
    pub connect_timeout: Duration,
    /// A request fails when the connection stays silent this long.
    pub read_timeout: Duration,
    /// Parallel requests a transfer keeps in flight.
    pub streams: usize,
    /// zstd level of upload streams.
    pub level: i32,
}

impl ClientConfig {
    pub fn new(url: &str) -> ClientConfig {
        ClientConfig {
            url: url.to_string(),
            credential: None,
            ca_pem: None,
            max_rate: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            streams: 4,
            level: DEFAULT_LEVEL,
        }
    }

    pub fn credential(mut self, c: &str) -> ClientConfig {
        self.credential = Some(c.to_string());
        self
    }
}

/// A verified object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub kind: ObjectKind,
    pub id: ChunkId,
    pub raw: Vec<u8>,
}

/// An object to upload, with an optional base (an object the hub is known to hold)
/// to send it as a delta against.
pub struct UploadObject {
    pub kind: ObjectKind,
    pub id: ChunkId,
    pub raw: Vec<u8>,
    pub base: Option<(ChunkId, Vec<u8>)>,
}

/// Where the bytes of delta bases come from on the receiving side.
pub trait BaseSource: Sync {
    fn base(&self, id: &ChunkId) -> Option<Vec<u8>>;
}

impl BaseSource for Store {
    fn base(&self, id: &ChunkId) -> Option<Vec<u8>> {
        self.read_objects(&[*id])
            .ok()?
            .pop()
            .flatten()
            .map(|(_, raw)| raw)
    }
}

/// No bases: ask for no deltas.
pub struct NoBases;

impl BaseSource for NoBases {
    fn base(&self, _: &ChunkId) -> Option<Vec<u8>> {
        None
    }
}

/// What one download brought. A cut connection leaves the objects that arrived whole
/// in `objects` and the cause in `error`: ask again for the rest.
#[derive(Debug, Default)]
pub struct Download {
    pub objects: Vec<Object>,
    /// Ids the hub said it does not hold.
    pub missing: Vec<ChunkId>,
    /// Objects that failed verification (not in `objects`).
    pub corrupt: Vec<(ChunkId, String)>,
    pub error: Option<SyncError>,
    /// Objects that came as deltas.
    pub deltas: u64,
    /// Of those, objects that came with page references.
    pub paged: u64,
}

/// Body bytes sent and received so far by one client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WireStats {
    pub sent: u64,
    pub received: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// A client of one hub. Cheap to clone (clones share connections, the rate limit and
/// the byte counters).
#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    base: Url,
    credential: Option<String>,
    limiter: Option<Arc<RateLimiter>>,
    counters: Arc<Counters>,
    streams: usize,
    level: i32,
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for c in CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| SyncError::Invalid(format!("CA certificate: {e}")))?;
            roots
                .add(c)
                .map_err(|e| SyncError::Invalid(format!("CA certificate: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncError::Invalid(e.to_string()))?;
    let mut cfg = if roots.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let pinned = roots_der(ca_pem.unwrap_or_default());
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| SyncError::Invalid(format!("CA certificate: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(HubCertVerifier { webpki, pinned }))
    }
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The certificates of a PEM file (those that parse; [`tls_config`] reports the rest).
fn roots_der(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(|c| c.ok())
        .collect()
}

/// Checks a hub's certificate as webpki does, with one addition: a certificate the
/// operator trusts *itself* (the `--ca` file holds that very certificate, not only an
/// issuer of it) is accepted even where webpki refuses it as a server's own for
/// reasons of its form. `openssl req -x509` makes exactly such certificates: marked
/// CA:TRUE, which webpki refuses in a server ("CaUsedAsEndEntity"). Its name must
/// still match the hub's URL, an expired or not-yet-valid one is still refused (those
/// are not errors of form), and the handshake must still be signed by its key.
#[derive(Debug)]
struct HubCertVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for HubCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let err = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let of_form = matches!(
            err,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))
        );
        if of_form
            && self
                .pinned
                .iter()
                .any(|c| c.as_ref() == end_entity.as_ref())
        {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&cert, server_name)?;
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        Err(err)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

impl HubClient {
    pub fn new(cfg: &ClientConfig) -> Result<HubClient> {
        let base = Url::parse(&cfg.url)
            .map_err(|e| SyncError::Invalid(format!("hub URL {:?}: {e}", cfg.url)))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(SyncError::Invalid(format!(
                "hub URL {:?}: must be http or https",
                cfg.url
            )));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(cfg.ca_pem.as_deref())?)
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(SyncError::from)?;
        Ok(HubClient {
            http,
            base,
            credential: cfg.credential.clone(),
            limiter: cfg.max_rate.map(|r| Arc::new(RateLimiter::new(r))),
            counters: Arc::new(Counters::default()),
            streams: cfg.streams.max(1),
            level: cfg.level,
        })
    }

    /// Parallel requests a transfer should keep in flight.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Body bytes on the wire so far.
    pub fn wire(&self) -> WireStats {
        WireStats {
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        {
            let mut p = u.path_segments_mut().expect("http(s) URLs have paths");
            p.pop_if_empty();
            p.push(API_PREFIX.trim_start_matches('/'));
            p.extend(segments);
        }
        u
    }

    fn request(&self, method: Method, segments: &[&str]) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(segments));
        match &self.credential {
            Some(c) => r.bearer_auth(c),
            None => r,
        }
    }

    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        body_len: usize,
    ) -> Result<reqwest::Response> {
        self.counters
            .sent
            .fetch_add(body_len as u64, Ordering::Relaxed);
        let resp = rb.send().await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(error_from(resp).await)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
        body_len: usize,
    ) -> Result<T> {
        let resp = self.send(rb, body_len).await?;
        let bytes = self.read_all(resp).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SyncError::Protocol(format!("hub answered with bad JSON: {e}")))
    }

    async fn send_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: &B,
    ) -> Result<T> {
        let b = serde_json::to_vec(body).expect("API types serialize");
        let n = b.len();
        let rb = self
            .request(method, segments)
            .header("content-type", "application/json")
            .body(b);
        self.json(rb, n).await
    }

    async fn read_all(&self, resp: reqwest::Response) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk?;
            self.received(chunk.len()).await;
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    async fn received(&self, n: usize) {
        self.counters
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        if let Some(l) = &self.limiter {
            l.take(n).await;
        }
    }

    // ---- points ----------------------------------------------------------------

    /// Exchange a one-time enrolment token for this point's credential. (Needs no
    /// credential; store the answer and build a new client with it.)
    pub async fn enroll(&self, token: &str) -> Result<EnrollResponse> {
        self.send_json(
            Method::POST,
            &["enroll"],
            &EnrollRequest {
                token: token.to_string(),
            },
        )
        .await
    }

    /// Images the caller may read.
    pub async fn images(&self) -> Result<Vec<ImageSummary>> {
        self.json(self.request(Method::GET, &["images"]), 0).await
    }

    /// One image with its branches and tags.
    pub async fn image(&self, image: &str) -> Result<ImageSummary> {
        self.json(self.request(Method::GET, &["images", image]), 0)
            .await
    }

    /// Resolve `rev` (branch, tag, id prefix, `~N`) of `image` on the hub and fetch
    /// its version record, verified against its id.
    pub async fn get_version(
        &self,
        image: &str,
        rev: &str,
    ) -> Result<(VersionId, Version, Vec<u8>)> {
        let r: VersionResponse = self
            .json(
                self.request(Method::GET, &["images", image, "versions", rev]),
                0,
            )
            .await?;
        let id = ChunkId::from_hex(&r.id)
            .ok_or_else(|| SyncError::Protocol(format!("bad version id {:?}", r.id)))?;
        let raw = r.record.into_bytes();
        if ChunkId::for_object(ObjectKind::Version, &raw) != id {
            return Err(SyncError::Corrupt {
                id,
                reason: "version record does not match its id".into(),
            });
        }
        let v = Version::decode(&raw).map_err(|reason| SyncError::Corrupt { id, reason })?;
        Ok((id, v, raw))
    }

    /// Download objects of `image` (which the caller must be granted). A want with
    /// a base asks for a delta against that object, whose bytes `bases` supplies when
    /// one arrives. Every object is verified before it is returned; see [`Download`]
    /// for what a failure leaves.
    pub async fn download(&self, image: &str, wants: &[Want], bases: &dyn BaseSource) -> Download {
        self.download_with(image, wants, bases, None).await
    }

    /// [`HubClient::download`], and when `pages_of` names a version of `image` whose
    /// every block the caller holds, objects may also come as references to pages of
    /// that version (see [`crate::pages`]), resolved from `bases`.
    pub async fn download_with(
        &self,
        image: &str,
        wants: &[Want],
        bases: &dyn BaseSource,
        pages_of: Option<VersionId>,
    ) -> Download {
        let mut out = Download::default();
        // Each object once: a disk often repeats a block (one id at many places), and
        // the hub sends every id asked for, so a repeat would arrive twice.
        let mut seen = std::collections::HashSet::new();
        let wants: Vec<Want> = wants
            .iter()
            .filter(|w| seen.insert(w.id))
            .copied()
            .collect();
        let wants = wants.as_slice();
        let body = encode_wants(wants);
        let n = body.len();
        let mut rb = self
            .request(Method::POST, &["images", image, "download"])
            .header("content-type", "application/octet-stream")
            .body(body);
        if let Some(v) = pages_of {
            rb = rb.query(&[("pages_of", v.to_hex())]);
        }
        let resp = match self.send(rb, n).await {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
        let mut asked: HashMap<ChunkId, Option<ChunkId>> =
            wants.iter().map(|w| (w.id, w.base)).collect();
        let mut reader = match FrameReader::new() {
            Ok(r) => r,
            Err(e) => {
                out.error = Some(e);
                return out;
            }
        };
        let mut stream = resp.bytes_stream();
        'outer: loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    self.received(chunk.len()).await;
                    reader.push(&chunk);
                    loop {
                        match reader.next_frame() {
                            Ok(None) => break,
                            Ok(Some(f)) => {
                                if let Err(e) = accept(f, &mut asked, bases, &mut out) {
                                    out.error = Some(e);
                                    break 'outer;
                                }
                            }
                            Err(e) => {
                                out.error = Some(e);
                                break 'outer;
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    out.error = Some(e.into());
                    break;
                }
                None => {
                    if !reader.ended() {
                        out.error = Some(SyncError::Truncated);
                    }
                    break;
                }
            }
        }
        out
    }

    /// Start an upload to `image` (which the caller must own, or which must not exist
    /// yet). Objects sent under one upload are protected on the hub from its gc until
    /// the upload is committed or abandoned (uploads expire after some idle minutes).
    pub async fn begin_upload(&self, image: &str) -> Result<String> {
        let r: UploadCreated = self
            .json(self.request(Method::POST, &["images", image, "uploads"]), 0)
            .await?;
        Ok(r.upload)
    }

    /// Of `ids`, those the hub lacks. The hub pins those it has for the rest of the
    /// upload, so the answer stays true.
    pub async fn missing(
        &self,
        image: &str,
        upload: &str,
        ids: &[ChunkId],
    ) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for part in ids.chunks(MAX_IDS_PER_REQUEST) {
            let body = encode_ids(part);
            let n = body.len();
            let rb = self
                .request(
                    Method::POST,
                    &["images", image, "uploads", upload, "missing"],
                )
                .header("content-type", "application/octet-stream")
                .body(body);
            let resp = self.send(rb, n).await?;
            let b = self.read_all(resp).await?;
            out.extend(
                decode_ids(&b).ok_or_else(|| SyncError::Protocol("bad id list from hub".into()))?,
            );
        }
        Ok(out)
    }

    /// Send objects in one body (one zstd stream; deltas where a base is given and
    /// smaller). The hub verifies each; children must arrive before (or with, earlier
    /// in the same body) the tree nodes that name them.
    pub async fn upload(
        &self,
        image: &str,
        upload: &str,
        objects: Vec<UploadObject>,
    ) -> Result<UploadReport> {
        let level = self.level;
        let body = tokio::task::spawn_blocking(move || encode_upload(objects, level))
            .await
            .map_err(|e| SyncError::Invalid(format!("upload encoder: {e}")))??;
        let n = body.len();
        let (limiter, counters) = (self.limiter.clone(), self.counters.clone());
        let pieces: Vec<Bytes> = Bytes::from(body)
            .chunks(64 << 10)
            .map(Bytes::copy_from_slice)
            .collect();
        // Counted as the pieces go out, not up front: a cut upload counts what it
        // sent, not the whole body.
        let stream = futures_util::stream::iter(pieces).then(move |p| {
            let (limiter, counters) = (limiter.clone(), counters.clone());
            async move {
                if let Some(l) = limiter {
                    l.take(p.len()).await;
                }
                counters.sent.fetch_add(p.len() as u64, Ordering::Relaxed);
                Ok::<Bytes, std::io::Error>(p)
            }
        });
        let rb = self
            .request(
                Method::POST,
                &["images", image, "uploads", upload, "objects"],
            )
            .header("content-type", OBJECTS_CONTENT_TYPE)
            .header("content-length", n)
            .body(reqwest::Body::wrap_stream(stream));
        self.json(rb, 0).await
    }

    /// Finish an upload: move `branch` from `expected` to `version` (which must be
    /// complete on the hub) by compare-and-swap. [`SyncError::Conflict`] if the
    /// branch moved.
    pub async fn commit_upload(
        &self,
        image: &str,
        upload: &str,
        branch: &str,
        expected: Option<&VersionId>,
        version: &VersionId,
    ) -> Result<RefUpdated> {
        self.send_json(
            Method::POST,
            &["images", image, "uploads", upload, "commit"],
            &CommitRequest {
                branch: branch.to_string(),
                expected: expected.map(|v| v.to_hex()),
                version: version.to_hex(),
            },
        )
        .await
    }

    /// Abandon an upload (what it sent goes at the hub's next gc unless used).
    pub async fn abort_upload(&self, image: &str, upload: &str) -> Result<()> {
        self.send(
            self.request(Method::DELETE, &["images", image, "uploads", upload]),
            0,
        )
        .await
        .map(drop)
    }

    /// Move `branch` of `image` to a version the hub already holds, by
    /// compare-and-swap.
    pub async fn cas_ref(
        &self,
        image: &str,
        branch: &str,
        expected: Option<&VersionId>,
        version: &VersionId,
    ) -> Result<RefUpdated> {
        self.send_json(
            Method::PUT,
            &["images", image, "branches", branch],
            &CasRequest {
                expected: expected.map(|v| v.to_hex()),
                version: version.to_hex(),
            },
        )
        .await
    }

    // ---- operators (admin credential) -------------------------------------------

    /// Make a one-time enrolment token for a point to be called `name`.
    pub async fn create_enrollment(&self, name: &str) -> Result<EnrollmentToken> {
        self.send_json(
            Method::POST,
            &["admin", "enrollments"],
            &EnrollmentRequest {
                name: name.to_string(),
            },
        )
        .await
    }

    pub async fn grant(&self, point: &str, image: &str) -> Result<()> {
        let g = Grant {
            point: point.into(),
            image: image.into(),
        };
        self.send_json::<_, serde_json::Value>(Method::POST, &["admin", "grants"], &g)
            .await
            .map(drop)
    }

    pub async fn revoke_grant(&self, point: &str, image: &str) -> Result<()> {
        let g = Grant {
            point: point.into(),
            image: image.into(),
        };
        self.send_json::<_, serde_json::Value>(Method::DELETE, &["admin", "grants"], &g)
            .await
            .map(drop)
    }

    /// Revoke a point's credential for good.
    pub async fn revoke_point(&self, name: &str) -> Result<()> {
        self.send(
            self.request(Method::POST, &["admin", "points", name, "revoke"]),
            0,
        )
        .await
        .map(drop)
    }

    pub async fn points(&self) -> Result<Vec<PointInfo>> {
        self.json(self.request(Method::GET, &["admin", "points"]), 0)
            .await
    }

    /// Every channel (operators), or those whose image this point may read.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>> {
        self.json(self.request(Method::GET, &["channels"]), 0).await
    }

    /// A channel's log, oldest first.
    pub async fn channel_log(&self, channel: &str) -> Result<Vec<ChannelLogEntry>> {
        let rb = self
            .request(Method::GET, &["channels", "log"])
            .query(&[("name", channel)]);
        self.json(rb, 0).await
    }

    pub async fn publish(&self, req: &PublishRequest) -> Result<ChannelInfo> {
        self.send_json(Method::POST, &["channels", "publish"], req)
            .await
    }

    pub async fn promote(&self, req: &PromoteRequest) -> Result<ChannelInfo> {
        self.send_json(Method::POST, &["channels", "promote"], req)
            .await
    }

    pub async fn rollback(&self, req: &RollbackRequest) -> Result<ChannelInfo> {
        self.send_json(Method::POST, &["channels", "rollback"], req)
            .await
    }

    pub async fn create_desktop(&self, req: &CreateDesktopRequest) -> Result<DesktopInfo> {
        self.send_json(Method::POST, &["admin", "desktops"], req)
            .await
    }

    /// Every desktop (operators), or those this point holds.
    pub async fn desktops(&self) -> Result<Vec<DesktopInfo>> {
        self.json(self.request(Method::GET, &["desktops"]), 0).await
    }

    pub async fn desktop(&self, name: &str) -> Result<DesktopInfo> {
        self.json(self.request(Method::GET, &["desktops", name]), 0)
            .await
    }

    pub async fn remove_desktop(&self, name: &str) -> Result<()> {
        self.send(
            self.request(Method::DELETE, &["admin", "desktops", name]),
            0,
        )
        .await
        .map(drop)
    }

    /// (Operators) hand desktop `name` to `point`; `force` takes it from its holder.
    pub async fn transfer_desktop(
        &self,
        name: &str,
        point: &str,
        force: bool,
    ) -> Result<DesktopInfo> {
        let req = TransferRequest {
            point: point.to_string(),
            force,
        };
        self.send_json(Method::POST, &["admin", "desktops", name, "transfer"], &req)
            .await
    }

    /// (Operators) roll desktop `name`'s user disk back (see [`RestoreRequest`]).
    pub async fn restore_desktop(&self, name: &str, to: &str) -> Result<RestoreResponse> {
        let req = RestoreRequest { to: to.to_string() };
        self.send_json(Method::POST, &["admin", "desktops", name, "restore"], &req)
            .await
    }

    /// The kept versions of desktop `name`'s user disk, newest first.
    pub async fn restore_points(&self, name: &str) -> Result<Vec<RestorePoint>> {
        self.json(
            self.request(Method::GET, &["desktops", name, "restore-points"]),
            0,
        )
        .await
    }

    /// (Points) check desktop `name` out to this point; 409 names the holder.
    pub async fn check_out(&self, name: &str) -> Result<DesktopInfo> {
        self.json(
            self.request(Method::POST, &["desktops", name, "checkout"]),
            0,
        )
        .await
    }

    pub async fn check_in(&self, name: &str) -> Result<DesktopInfo> {
        self.json(
            self.request(Method::POST, &["desktops", name, "checkin"]),
            0,
        )
        .await
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let mut rb = self.request(Method::GET, &["admin", "audit"]);
        rb = rb.query(&[("limit", limit)]);
        self.json(rb, 0).await
    }

    // ---- desktops in detail (OS resets, the holder's reports) --------------------

    /// Desktop `name` with its OS reset requests and its holder's last report.
    pub async fn desktop_detail(&self, name: &str) -> Result<DesktopDetail> {
        self.json(self.request(Method::GET, &["desktops", name]), 0)
            .await
    }

    /// Every desktop (operators), or those this point holds, in detail.
    pub async fn desktops_detail(&self) -> Result<Vec<DesktopDetail>> {
        self.json(self.request(Method::GET, &["desktops"]), 0).await
    }

    /// (Points) [`HubClient::check_out`], answered in detail (the OS reset
    /// generation to apply).
    pub async fn check_out_detail(&self, name: &str) -> Result<DesktopDetail> {
        self.json(
            self.request(Method::POST, &["desktops", name, "checkout"]),
            0,
        )
        .await
    }

    /// (Operators) ask for desktop `name`'s OS disk to return to its channel's
    /// version at the holder's next start.
    pub async fn reset_desktop_os(&self, name: &str) -> Result<DesktopDetail> {
        self.json(
            self.request(Method::POST, &["admin", "desktops", name, "reset-os"]),
            0,
        )
        .await
    }

    /// (The holding point) report what it runs of desktop `name` and what it has
    /// that the hub lacks. 403 means the desktop is checked out elsewhere now.
    pub async fn report_desktop(&self, name: &str, report: &DesktopPointReport) -> Result<()> {
        let b = serde_json::to_vec(report).expect("API types serialize");
        let n = b.len();
        let rb = self
            .request(Method::POST, &["desktops", name, "report"])
            .header("content-type", "application/json")
            .body(b);
        self.send(rb, n).await.map(drop)
    }
}

/// Check one downloaded frame and keep what is good.
fn accept(
    f: Frame,
    asked: &mut HashMap<ChunkId, Option<ChunkId>>,
    bases: &dyn BaseSource,
    out: &mut Download,
) -> Result<()> {
    match f {
        Frame::Object { kind, id, body } => {
            let Some(want_base) = asked.remove(&id) else {
                return Err(SyncError::Protocol(format!(
                    "hub sent object {id} that was not asked for (or twice)"
                )));
            };
            // (Page runs may name any chunk: one the point lacks fails to resolve.)
            if let Body::Delta { base, .. } = &body {
                if want_base != Some(*base) {
                    out.corrupt
                        .push((id, "delta against a base that was not offered".into()));
                    return Ok(());
                }
            }
            let delta = !matches!(body, Body::Raw(_));
            let paged = matches!(body, Body::Pages { .. });
            let raw = match crate::delta::resolve(body, bases) {
                Ok(r) => {
                    out.deltas += delta as u64;
                    out.paged += paged as u64;
                    r
                }
                Err(reason) => {
                    out.corrupt.push((id, reason));
                    return Ok(());
                }
            };
            if ChunkId::for_object(kind, &raw) != id {
                out.corrupt
                    .push((id, format!("{} object does not match its id", kind.name())));
                return Ok(());
            }
            out.objects.push(Object { kind, id, raw });
            Ok(())
        }
        Frame::Missing(id) => {
            asked.remove(&id);
            out.missing.push(id);
            Ok(())
        }
        Frame::Error(m) => Err(SyncError::Hub {
            status: 500,
            code: "internal".into(),
            message: m,
        }),
        Frame::End => Ok(()),
    }
}

/// Encode an upload body: one zstd stream, deltas where they are smaller.
pub fn encode_upload(objects: Vec<UploadObject>, level: i32) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let frames: Vec<Frame> = objects
        .into_par_iter()
        .map(|o| {
            let base = o.base.as_ref().map(|(bid, b)| (*bid, b.as_slice()));
            let body = crate::delta::smaller_body(o.raw, &o.id, base, level);
            Frame::Object {
                kind: o.kind,
                id: o.id,
                body,
            }
        })
        .collect();
    let mut w = FrameWriter::new(level)?;
    let mut out = Vec::new();
    for f in &frames {
        w.frame(f)?;
        out.extend(w.take());
    }
    out.extend(w.finish()?);
    Ok(out)
}

async fn error_from(resp: reqwest::Response) -> SyncError {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => (b.code, b.error),
        Err(_) => (String::new(), text),
    };
    match status {
        StatusCode::UNAUTHORIZED => SyncError::Unauthorized(message),
        StatusCode::FORBIDDEN => SyncError::Forbidden(message),
        StatusCode::CONFLICT if code == "conflict" => SyncError::Conflict(message),
        s => SyncError::Hub {
            status: s.as_u16(),
            code,
            message,
        },
    }
}
