//! The `/v1` endpoints (see `docs/hub-api.yaml`).
//!
//! Store work is blocking (SQLite, pack files, zstd on all cores), so every handler
//! runs it on tokio's blocking pool; bodies stream in both directions through
//! bounded buffers, so a slow peer holds back the work instead of filling memory.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use strata_store::{BranchUpdate, ChunkId, ObjectKind, RefKind, StoreError, WriteSession};
use strata_sync::api::*;
use strata_sync::frame::{Body as ObjBody, Frame, FrameReader, FrameWriter};

use crate::db::{hash_secret, now, DbError};
use crate::{random_secret, Hub, Upload};

pub(crate) type AppState = Arc<Hub>;

pub(crate) fn router(hub: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(|| async { "ok\n" }))
        .route("/v1/enroll", post(enroll))
        .route("/v1/images", get(list_images))
        .route("/v1/images/{image}", get(get_image))
        .route("/v1/images/{image}/versions/{rev}", get(get_version))
        .route("/v1/images/{image}/download", post(download))
        .route("/v1/images/{image}/uploads", post(begin_upload))
        .route("/v1/images/{image}/uploads/{upload}", delete(abort_upload))
        .route("/v1/images/{image}/uploads/{upload}/missing", post(missing))
        .route(
            "/v1/images/{image}/uploads/{upload}/objects",
            post(upload_objects),
        )
        .route(
            "/v1/images/{image}/uploads/{upload}/commit",
            post(commit_upload),
        )
        .route("/v1/images/{image}/branches/{branch}", put(cas_branch))
        .route("/v1/admin/enrollments", post(create_enrollment))
        .route("/v1/admin/points", get(list_points))
        .route("/v1/admin/points/{name}/revoke", post(revoke_point))
        .route("/v1/admin/grants", post(grant).delete(revoke_grant))
        .route("/v1/admin/audit", get(audit_log))
        .route("/v1/channels", get(crate::channels::list))
        .route("/v1/channels/log", get(crate::channels::log))
        .route("/v1/channels/publish", post(crate::channels::publish))
        .route("/v1/channels/promote", post(crate::channels::promote))
        .route("/v1/channels/rollback", post(crate::channels::rollback))
        .route("/v1/desktops", get(crate::desktops::list))
        .route("/v1/desktops/{name}", get(crate::desktops::show))
        .route(
            "/v1/desktops/{name}/checkout",
            post(crate::desktops::check_out),
        )
        .route(
            "/v1/desktops/{name}/checkin",
            post(crate::desktops::check_in),
        )
        .route("/v1/admin/desktops", post(crate::desktops::create))
        .route("/v1/admin/desktops/{name}", delete(crate::desktops::remove))
        .route(
            "/v1/admin/desktops/{name}/transfer",
            post(crate::desktops::transfer),
        )
        .route(
            "/v1/admin/desktops/{name}/restore",
            post(crate::desktops::restore),
        )
        .route(
            "/v1/desktops/{name}/restore-points",
            get(crate::desktops::restore_points),
        )
        .route("/v1/desktops/{name}/report", post(crate::desktops::report))
        .route(
            "/v1/admin/desktops/{name}/reset-os",
            post(crate::desktops::reset_os),
        )
        // Id lists are at most 64 B × 65,536; object streams are read incrementally
        // and have no overall limit.
        .layer(DefaultBodyLimit::max(MAX_IDS_PER_REQUEST * 64 + 4096))
        .with_state(hub)
}

// ---- errors --------------------------------------------------------------------------

pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    msg: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            msg: msg.into(),
        }
    }
    pub(crate) fn unauthorized(msg: &str) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", msg)
    }
    pub(crate) fn forbidden(msg: String) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg)
    }
    pub(crate) fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", msg)
    }
    pub(crate) fn not_found(msg: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", msg)
    }
    pub(crate) fn internal(msg: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %msg, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            msg.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = Json(ErrorBody {
            code: self.code.to_string(),
            error: self.msg,
        })
        .into_response();
        *r.status_mut() = self.status;
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        use StoreError::*;
        let msg = e.to_string();
        match e {
            NoSuchImage(_) | NoSuchRef { .. } | BadRevision { .. } => ApiError::not_found(msg),
            RefConflict { .. } | RefExists { .. } | ImageExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", msg)
            }
            Corrupt { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_object", msg),
            MissingObject { .. } => ApiError::new(StatusCode::CONFLICT, "missing_object", msg),
            InvalidName { .. } | InvalidBlockSize(_) | Invalid(_) => ApiError::bad_request(msg),
            _ => ApiError::internal(msg),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        ApiError::internal(e)
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Run blocking work on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
}

// ---- authentication and access -------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) enum Caller {
    Admin,
    Point(String),
}

impl Caller {
    pub(crate) fn actor(&self) -> String {
        match self {
            Caller::Admin => "admin".into(),
            Caller::Point(p) => format!("point:{p}"),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &AppState) -> ApiResult<Caller> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| ApiError::unauthorized("a bearer credential is required"))?;
        // blake3::Hash compares in constant time.
        if blake3::hash(token.as_bytes()) == hub.admin {
            return Ok(Caller::Admin);
        }
        let h = hash_secret(token);
        let touch = |name: String| {
            let hub2 = hub.clone();
            async move {
                let _ = blocking(move || Ok(hub2.db.touch_point(&name, now())?)).await;
            }
        };
        if let Some((name, due)) = hub.credentials.lookup(&h) {
            if due {
                touch(name.clone()).await;
            }
            return Ok(Caller::Point(name));
        }
        let generation = hub.credentials.generation();
        let hub2 = hub.clone();
        let row = blocking(move || Ok(hub2.db.point_by_credential(&h)?)).await?;
        match row {
            Some(p) if !p.revoked => {
                touch(p.name.clone()).await;
                hub.credentials.remember(h, &p.name, generation);
                Ok(Caller::Point(p.name))
            }
            Some(_) => Err(ApiError::unauthorized(
                "this point's credential was revoked",
            )),
            None => Err(ApiError::unauthorized("unknown credential")),
        }
    }
}

pub(crate) fn require_admin(c: &Caller) -> ApiResult<()> {
    match c {
        Caller::Admin => Ok(()),
        Caller::Point(p) => Err(ApiError::forbidden(format!(
            "point {p:?} is not an operator"
        ))),
    }
}

pub(crate) fn can_read(hub: &Hub, c: &Caller, image: &str) -> ApiResult<bool> {
    Ok(match c {
        Caller::Admin => true,
        Caller::Point(p) => {
            hub.db.owner(image)?.as_deref() == Some(p.as_str())
                || hub.db.is_granted(p, image)?
                || crate::desktops::may_read(hub, p, image)?
        }
    })
}

async fn check_read(hub: &AppState, c: &Caller, image: &str) -> ApiResult<()> {
    let (h, c2, i) = (hub.clone(), c.clone(), image.to_string());
    if blocking(move || can_read(&h, &c2, &i)).await? {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "{} may not read image {image:?}",
            c.actor()
        )))
    }
}

/// A point may write an image it owns, or claim one that does not exist yet.
/// Operators may write any image.
fn check_write(hub: &Hub, c: &Caller, image: &str, claim: bool) -> ApiResult<()> {
    let Caller::Point(p) = c else { return Ok(()) };
    if let Some(allowed) = crate::desktops::may_write(hub, p, image)? {
        return allowed;
    }
    let owner = match hub.db.owner(image)? {
        Some(o) => o,
        None if claim && hub.store.image_block_size(image)?.is_none() => {
            strata_store::validate_name(image)?;
            let o = hub.db.claim(image, p)?;
            if o == *p {
                hub.db.audit(&c.actor(), "image.claim", image, "")?;
            }
            o
        }
        None => String::new(),
    };
    if owner == *p {
        Ok(())
    } else {
        Err(ApiError::forbidden(format!(
            "point {p:?} may not write image {image:?} (it does not own it)"
        )))
    }
}

// ---- points ----------------------------------------------------------------------------

async fn enroll(
    State(hub): State<AppState>,
    Json(req): Json<EnrollRequest>,
) -> ApiResult<Json<EnrollResponse>> {
    let credential = random_secret("strata-point-");
    let c = credential.clone();
    let point = blocking(move || {
        let name = hub
            .db
            .redeem_enrollment(&hash_secret(&req.token), &hash_secret(&c), now())?
            .ok_or_else(|| ApiError::unauthorized("unknown, used or expired enrolment token"))?;
        // A point enrolled again: its old credential no longer holds.
        hub.credentials.forget_point(&name);
        hub.db
            .audit(&format!("point:{name}"), "enroll", &name, "")?;
        Ok(name)
    })
    .await?;
    Ok(Json(EnrollResponse { point, credential }))
}

fn summary(hub: &Hub, c: &Caller, info: strata_store::ImageInfo) -> ApiResult<ImageSummary> {
    let owner = hub.db.owner(&info.name)?;
    let writable = match c {
        Caller::Admin => true,
        Caller::Point(p) => owner.as_deref() == Some(p.as_str()),
    };
    let refs = |v: Vec<strata_store::RefInfo>| {
        v.into_iter()
            .map(|r| RefEntry {
                name: r.name,
                version: r.version,
            })
            .collect()
    };
    Ok(ImageSummary {
        name: info.name,
        block_size: info.block_size,
        owner,
        writable,
        branches: refs(info.branches),
        tags: refs(info.tags),
    })
}

async fn list_images(State(hub): State<AppState>, c: Caller) -> ApiResult<Json<Vec<ImageSummary>>> {
    blocking(move || {
        let mut out = Vec::new();
        for info in hub.store.images()? {
            if can_read(&hub, &c, &info.name)? {
                out.push(summary(&hub, &c, info)?);
            }
        }
        Ok(Json(out))
    })
    .await
}

async fn get_image(
    State(hub): State<AppState>,
    c: Caller,
    Path(image): Path<String>,
) -> ApiResult<Json<ImageSummary>> {
    check_read(&hub, &c, &image).await?;
    blocking(move || {
        let info = hub.store.image(&image)?;
        Ok(Json(summary(&hub, &c, info)?))
    })
    .await
}

async fn get_version(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, rev)): Path<(String, String)>,
) -> ApiResult<Json<VersionResponse>> {
    check_read(&hub, &c, &image).await?;
    blocking(move || {
        let id = hub.store.resolve(&image, Some(&rev))?;
        let raw = hub.store.read_object(&id, ObjectKind::Version)?;
        let record = String::from_utf8(raw)
            .map_err(|_| ApiError::internal(format!("version record {id} is not UTF-8")))?;
        Ok(Json(VersionResponse {
            id: id.to_hex(),
            record,
        }))
    })
    .await
}

/// Objects per read-and-encode step of a download.
const DOWNLOAD_STEP: usize = 64;

/// How long a download waits for the page index of the version it names.
const PAGE_INDEX_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Deserialize)]
struct DownloadQuery {
    /// A version of the image the caller holds wholly: blocks may come as
    /// references to its pages.
    pages_of: Option<String>,
}

async fn download(
    State(hub): State<AppState>,
    c: Caller,
    Path(image): Path<String>,
    Query(q): Query<DownloadQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    check_read(&hub, &c, &image).await?;
    let wants = decode_wants(&body).ok_or_else(|| {
        ApiError::bad_request(format!(
            "a download names at most {MAX_IDS_PER_REQUEST} objects as 64-byte records"
        ))
    })?;
    let pages_of =
        match q.pages_of.as_deref() {
            None => None,
            Some(h) => Some(ChunkId::from_hex(h).ok_or_else(|| {
                ApiError::bad_request(format!("pages_of={h:?} is not a version id"))
            })?),
        };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        // Only a version of this image (which the caller may read) is used.
        let index = pages_of
            .filter(|v| hub.pages.belongs(&hub.store, &image, v))
            .and_then(|v| hub.pages.get(&hub.store, v, PAGE_INDEX_WAIT));
        let send = |b: Vec<u8>| b.is_empty() || tx.blocking_send(Ok(Bytes::from(b))).is_ok();
        let mut w = match FrameWriter::new(hub.level) {
            Ok(w) => w,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        for step in wants.chunks(DOWNLOAD_STEP) {
            let frames = match encode_step(&hub, step, index.as_deref()) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "download failed");
                    if let Ok(b) = w.finish_with_error(&e.to_string()) {
                        send(b);
                    }
                    return;
                }
            };
            for f in &frames {
                if w.frame(f).is_err() {
                    return;
                }
            }
            // Push bytes out every MiB or so, so the client can decode as they come.
            if w.pending() >= 1 << 20 && w.flush().is_err() {
                return;
            }
            if !send(w.take()) {
                return; // the client went away
            }
        }
        if let Ok(b) = w.finish() {
            send(b);
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, OBJECTS_CONTENT_TYPE)],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Read one step of a download and encode its frames (deltas where asked for and
/// smaller), on all cores.
fn encode_step(
    hub: &Hub,
    step: &[Want],
    pages: Option<&strata_sync::pages::PageIndex>,
) -> Result<Vec<Frame>, StoreError> {
    use rayon::prelude::*;
    let ids: Vec<ChunkId> = step.iter().map(|w| w.id).collect();
    let objs = hub.store.read_objects(&ids)?;
    let base_ids: Vec<ChunkId> = step.iter().filter_map(|w| w.base).collect();
    let mut base_objs = hub.store.read_objects(&base_ids)?.into_iter();
    let bases: Vec<Option<(ChunkId, strata_store::store::TypedObject)>> = step
        .iter()
        .map(|w| {
            w.base
                .and_then(|b| base_objs.next().flatten().map(|o| (b, o)))
        })
        .collect();
    let level = hub.level;
    Ok(step
        .par_iter()
        .zip(objs.into_par_iter())
        .zip(bases.into_par_iter())
        .map(|((w, obj), base)| {
            let Some((kind, raw)) = obj else {
                return Frame::Missing(w.id);
            };
            let base = base
                .as_ref()
                .filter(|(_, (bkind, _))| *bkind == kind)
                .map(|(bid, (_, braw))| (*bid, braw.as_slice()));
            let body = match kind {
                ObjectKind::Data => strata_sync::pages::pages_body(
                    raw,
                    &w.id,
                    base,
                    pages,
                    |ids| hub.store.read_chunks(ids).ok(),
                    level,
                ),
                _ => strata_sync::delta::smaller_body(raw, &w.id, base, level),
            };
            Frame::Object {
                kind,
                id: w.id,
                body,
            }
        })
        .collect())
}

// ---- uploads ---------------------------------------------------------------------------

async fn begin_upload(
    State(hub): State<AppState>,
    c: Caller,
    Path(image): Path<String>,
) -> ApiResult<Json<UploadCreated>> {
    blocking(move || {
        check_write(&hub, &c, &image, true)?;
        flush_uploads_of(&hub, &c.actor(), &image)?;
        let session = WriteSession::begin_owned(
            hub.store.clone(),
            &format!("upload to {image} by {}", c.actor()),
        )?;
        let id = strata_store::id::random_hex16();
        let up = Upload {
            image: image.clone(),
            point: c.actor(),
            session: Some(session),
            last_used: Instant::now(),
        };
        hub.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), Arc::new(Mutex::new(up)));
        Ok(Json(UploadCreated { upload: id }))
    })
    .await
}

/// Index what `point`'s open uploads of `image` received, so that a push starting
/// over (a new upload after one that failed part-way) sees it as present and does
/// not send it again. Their sessions stay usable. An upload busy with a request is
/// passed over rather than waited for (it may be another point's): a request that
/// was cut indexes what it received itself.
fn flush_uploads_of(hub: &Hub, point: &str, image: &str) -> ApiResult<()> {
    let open: Vec<Arc<Mutex<Upload>>> = hub
        .uploads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    for up in open {
        let Ok(mut u) = up.try_lock() else { continue };
        if u.point == point && u.image == image {
            if let Some(s) = u.session.as_mut() {
                s.flush()?;
            }
        }
    }
    Ok(())
}

/// The upload `id`, which must be the caller's and for `image`.
fn find_upload(hub: &Hub, c: &Caller, image: &str, id: &str) -> ApiResult<Arc<Mutex<Upload>>> {
    check_write(hub, c, image, false)?;
    let up = hub
        .uploads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(id)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no upload {id:?} (it may have expired)")))?;
    {
        let u = up.lock().unwrap_or_else(|p| p.into_inner());
        if u.image != image || u.point != c.actor() {
            return Err(ApiError::forbidden(format!("upload {id:?} is not yours")));
        }
    }
    Ok(up)
}

fn with_session<T>(
    up: &Mutex<Upload>,
    f: impl FnOnce(&mut WriteSession<'static>) -> ApiResult<T>,
) -> ApiResult<T> {
    let mut u = up.lock().unwrap_or_else(|p| p.into_inner());
    u.last_used = Instant::now();
    let s = u
        .session
        .as_mut()
        .ok_or_else(|| ApiError::not_found("the upload has ended"))?;
    f(s)
}

async fn missing(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, id)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Vec<u8>> {
    let ids = decode_ids(&body).ok_or_else(|| {
        ApiError::bad_request(format!("at most {MAX_IDS_PER_REQUEST} ids of 32 bytes"))
    })?;
    blocking(move || {
        let up = find_upload(&hub, &c, &image, &id)?;
        let lacking = with_session(&up, |s| Ok(s.lacking(&ids)?))?;
        Ok(encode_ids(&lacking))
    })
    .await
}

/// Raw bytes of received objects handed to the store at a time.
const STORE_BATCH: usize = 4 << 20;

async fn upload_objects(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, id)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<UploadReport>> {
    let up = {
        let (h, c, i, u) = (hub.clone(), c.clone(), image.clone(), id.clone());
        blocking(move || find_upload(&h, &c, &i, &u)).await?
    };
    let mut reader = FrameReader::new().map_err(ApiError::internal)?;
    let mut stream = body.into_data_stream();
    let mut pending: Vec<(ObjectKind, ChunkId, ObjBody)> = Vec::new();
    let mut pending_bytes = 0usize;
    let mut report = UploadReport::default();
    let mut failure: Option<ApiError> = None;
    'body: while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break }; // cut: keep what arrived whole
        reader.push(&chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(Frame::Object { kind, id, body })) => {
                    pending_bytes += body.wire_len();
                    pending.push((kind, id, body));
                }
                Ok(Some(Frame::End)) | Ok(None) => break,
                Ok(Some(f)) => {
                    failure = Some(ApiError::bad_request(format!("unexpected frame {f:?}")));
                    break 'body;
                }
                Err(e) => {
                    failure = Some(ApiError::bad_request(e.to_string()));
                    break 'body;
                }
            }
        }
        if pending_bytes >= STORE_BATCH {
            if let Err(e) = store_batch(&hub, &up, std::mem::take(&mut pending), &mut report).await
            {
                failure = Some(e);
                break;
            }
            pending_bytes = 0;
        }
    }
    if failure.is_none() && !pending.is_empty() {
        if let Err(e) = store_batch(&hub, &up, pending, &mut report).await {
            failure = Some(e);
        }
    }
    if failure.is_none() && reader.ended() {
        // Complete: later requests of this upload find these objects through its
        // session, and its commit (or the start of the point's next upload of this
        // image, or expiry) indexes them, so a push leaves a pack or two, not one
        // per request.
        return Ok(Json(report));
    }
    // Cut or refused: index what arrived whole, so that the resumed push finds it
    // even under a new upload.
    let up2 = up.clone();
    blocking(move || with_session(&up2, |s| Ok(s.flush()?))).await?;
    Err(failure.unwrap_or_else(|| ApiError::bad_request("object stream cut short")))
}

/// Resolve deltas against the hub's store and add the objects (verified by the
/// session: hash, and children before parents).
async fn store_batch(
    hub: &AppState,
    up: &Arc<Mutex<Upload>>,
    batch: Vec<(ObjectKind, ChunkId, ObjBody)>,
    report: &mut UploadReport,
) -> ApiResult<()> {
    let (hub, up) = (hub.clone(), up.clone());
    let (n, new, raw_bytes) = blocking(move || {
        let base_ids: Vec<ChunkId> = batch
            .iter()
            .filter_map(|(_, _, b)| match b {
                ObjBody::Delta { base, .. } => Some(*base),
                ObjBody::Raw(_) | ObjBody::Pages { .. } => None,
            })
            .collect();
        let mut bases = hub.store.read_objects(&base_ids)?.into_iter();
        let mut objs: Vec<(ObjectKind, ChunkId, Vec<u8>)> = Vec::with_capacity(batch.len());
        for (kind, id, body) in batch {
            let raw = match body {
                ObjBody::Raw(r) => r,
                // Only the hub sends page references: a point naming chunks of other
                // images would learn from success or failure whether it guessed them.
                ObjBody::Pages { .. } => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "bad_object",
                        format!("object {id}: page references are not accepted in uploads"),
                    ))
                }
                ObjBody::Delta {
                    base,
                    raw_len,
                    zframe,
                } => {
                    let (_, b) = bases.next().flatten().ok_or_else(|| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "bad_object",
                            format!("delta of {id} against {base}, which the hub does not hold"),
                        )
                    })?;
                    strata_sync::delta::decode(&b, &zframe, raw_len as usize).map_err(|e| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "bad_object",
                            format!("object {id}: {e}"),
                        )
                    })?
                }
            };
            objs.push((kind, id, raw));
        }
        let refs: Vec<(ObjectKind, ChunkId, &[u8])> = objs
            .iter()
            .map(|(k, i, r)| (*k, *i, r.as_slice()))
            .collect();
        let new = with_session(&up, |s| Ok(s.add_received(&refs)?))?;
        let raw_bytes: usize = objs.iter().map(|(_, _, r)| r.len()).sum();
        Ok((objs.len(), new, raw_bytes))
    })
    .await?;
    report.objects += n as u64;
    report.new_objects += new as u64;
    report.raw_bytes += raw_bytes as u64;
    Ok(())
}

fn parse_version(s: &str) -> ApiResult<ChunkId> {
    ChunkId::from_hex(s).ok_or_else(|| ApiError::bad_request(format!("bad version id {s:?}")))
}

fn parse_expected(s: &Option<String>) -> ApiResult<Option<ChunkId>> {
    s.as_deref().map(parse_version).transpose()
}

async fn commit_upload(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, id)): Path<(String, String)>,
    Json(req): Json<CommitRequest>,
) -> ApiResult<Json<RefUpdated>> {
    let version = parse_version(&req.version)?;
    let expected = parse_expected(&req.expected)?;
    blocking(move || {
        let up = find_upload(&hub, &c, &image, &id)?;
        hub.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let session = up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .session
            .take()
            .ok_or_else(|| ApiError::not_found("the upload has ended"))?;
        strata_store::validate_name(&req.branch)?;
        crate::desktops::check_branch(&hub, &c, &image, &req.branch)?;
        session.commit_received(
            &version,
            &BranchUpdate {
                image: image.clone(),
                branch: req.branch.clone(),
                expected,
                create_image: true,
            },
        )?;
        crate::desktops::after_main_moved(&hub, &image, &req.branch, &version)?;
        hub.db.audit(
            &c.actor(),
            "push",
            &format!("{image}:{}", req.branch),
            &format!(
                "{} -> {}",
                expected.map_or("none".into(), |v| v.to_hex()),
                version.to_hex()
            ),
        )?;
        Ok(Json(RefUpdated {
            image,
            branch: req.branch,
            version: version.to_hex(),
        }))
    })
    .await
}

async fn abort_upload(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    blocking(move || {
        let up = find_upload(&hub, &c, &image, &id)?;
        hub.uploads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(mut s) = up.lock().unwrap_or_else(|p| p.into_inner()).session.take() {
            s.flush()?;
        }
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn cas_branch(
    State(hub): State<AppState>,
    c: Caller,
    Path((image, branch)): Path<(String, String)>,
    Json(req): Json<CasRequest>,
) -> ApiResult<Json<RefUpdated>> {
    let version = parse_version(&req.version)?;
    let expected = parse_expected(&req.expected)?;
    blocking(move || {
        check_write(&hub, &c, &image, false)?;
        strata_store::validate_name(&branch)?;
        crate::desktops::check_branch(&hub, &c, &image, &branch)?;
        if hub.store.get_ref(&image, RefKind::Tag, &branch)?.is_some() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{branch:?} is a tag of {image:?}"),
            ));
        }
        hub.store
            .update_branch(&image, &branch, expected.as_ref(), &version)?;
        crate::desktops::after_main_moved(&hub, &image, &branch, &version)?;
        hub.db.audit(
            &c.actor(),
            "ref.update",
            &format!("{image}:{branch}"),
            &format!(
                "{} -> {}",
                expected.map_or("none".into(), |v| v.to_hex()),
                version.to_hex()
            ),
        )?;
        Ok(Json(RefUpdated {
            image,
            branch,
            version: version.to_hex(),
        }))
    })
    .await
}

// ---- operators -------------------------------------------------------------------------

async fn create_enrollment(
    State(hub): State<AppState>,
    c: Caller,
    Json(req): Json<EnrollmentRequest>,
) -> ApiResult<Json<EnrollmentToken>> {
    require_admin(&c)?;
    strata_store::validate_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    blocking(move || {
        let token = random_secret("strata-enroll-");
        let expires = now() + hub.enrollment_ttl.as_secs() as i64;
        hub.db
            .create_enrollment(&req.name, &hash_secret(&token), expires)?;
        hub.db
            .audit(&c.actor(), "enrollment.create", &req.name, "")?;
        Ok(Json(EnrollmentToken {
            name: req.name,
            token,
            expires,
        }))
    })
    .await
}

async fn list_points(State(hub): State<AppState>, c: Caller) -> ApiResult<Json<Vec<PointInfo>>> {
    require_admin(&c)?;
    blocking(move || Ok(Json(hub.db.points()?))).await
}

async fn revoke_point(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(&c)?;
    blocking(move || {
        if !hub.db.revoke_point(&name)? {
            return Err(ApiError::not_found(format!("no point named {name:?}")));
        }
        hub.credentials.forget_point(&name);
        hub.db.audit(&c.actor(), "point.revoke", &name, "")?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn grant(
    State(hub): State<AppState>,
    c: Caller,
    Json(g): Json<Grant>,
) -> ApiResult<Json<Grant>> {
    require_admin(&c)?;
    blocking(move || {
        if !hub.db.point_exists(&g.point)? {
            return Err(ApiError::not_found(format!("no point named {:?}", g.point)));
        }
        hub.db.grant(&g.point, &g.image)?;
        hub.db.audit(&c.actor(), "grant", &g.point, &g.image)?;
        Ok(Json(g))
    })
    .await
}

async fn revoke_grant(
    State(hub): State<AppState>,
    c: Caller,
    Json(g): Json<Grant>,
) -> ApiResult<Json<Grant>> {
    require_admin(&c)?;
    blocking(move || {
        if !hub.db.revoke_grant(&g.point, &g.image)? {
            return Err(ApiError::not_found("no such grant"));
        }
        hub.db
            .audit(&c.actor(), "grant.revoke", &g.point, &g.image)?;
        Ok(Json(g))
    })
    .await
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<u32>,
}

async fn audit_log(
    State(hub): State<AppState>,
    c: Caller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    require_admin(&c)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    blocking(move || Ok(Json(hub.db.audit_log(limit)?))).await
}
