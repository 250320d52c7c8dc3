//! Desktops: an OS disk that follows a channel, a user disk of its own, and one
//! writer at a time.
//!
//! The user disk is an ordinary image on the hub (`desktops/NAME/user`), created
//! with the desktop (empty, or a copy of a template that shares its blocks). A
//! desktop is checked out to at most one point ([`crate::db::MetaDb::check_out`], a
//! compare-and-set in one transaction with its audit entry); a second point is
//! refused with the holder's name and last contact, and an operator's forced
//! transfer moves it and bumps the desktop's epoch.
//!
//! **Access.** The holder may read the channel's image and read and write the user
//! image's branches. A point that held the desktop before a transfer may still push,
//! but only to `recovery/...` branches: its unsynced changes are kept as a named
//! recovery version instead of being lost, and can never overwrite the new holder's
//! `main`.
//!
//! **The hub as holder.** `strata hub desktop serve NAME --writable` checks the
//! desktop out to [`HUB_HOLDER`] (an operator's transfer, audited) while it serves
//! it from the hub's store; no point may act under that name. The serving command
//! commits what it served to `main` by compare-and-swap and then releases the hold
//! (an operator's check-in), so `strata desktop transfer NAME POINT` hands it on
//! without `--force`. A point that held it before keeps its tail as a recovery
//! branch, as after any forced transfer.
//!
//! **OS resets.** An operator's `reset-os` counts a request on the desktop; the
//! holder compares that count with the one it applied at its next start and, if it
//! is behind, starts its OS disk over from the channel's version (never under a
//! running VM).
//!
//! **Reports.** In each sync round the holder reports what it runs (OS version,
//! user disk's local and pushed versions, bytes the hub lacks); the hub keeps the
//! newest report per desktop and shows it with the hub's own view. A report from a
//! point that no longer holds the desktop is refused with 403, which is how such a
//! point learns that it lost the desktop even when it has nothing to push.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use strata_store::{CommitTarget, RefKind, WriteSession};
use strata_sync::api::{
    CreateDesktopRequest, DesktopDetail, DesktopInfo, DesktopPointReport, DesktopPointStatus,
    RestorePoint, RestoreRequest, RestoreResponse, TransferRequest, HUB_HOLDER,
};

use crate::db::{now, DesktopRow};
use crate::routes::{blocking, require_admin, ApiError, ApiResult, AppState, Caller};
use crate::Hub;

/// The hub image of desktop `name`'s user disk.
pub fn user_image(name: &str) -> String {
    format!("desktops/{name}/user")
}

/// Branches a former holder may still push to.
pub const RECOVERY_PREFIX: &str = "recovery/";

fn conflict(msg: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", msg)
}

fn no_desktop(name: &str) -> ApiError {
    ApiError::not_found(format!("no desktop named {name:?}"))
}

/// The image and version the desktop's channel points at now.
fn channel_now(hub: &Hub, channel: &str) -> ApiResult<Option<(String, String)>> {
    Ok(hub.db.channel_head(channel)?.map(|e| (e.image, e.version)))
}

/// Does point `p` hold desktop `d`? (Never under the hub's own name.)
fn holds(d: &DesktopRow, p: &str) -> bool {
    p != HUB_HOLDER && d.holder.as_deref() == Some(p)
}

/// A point enrolled under the hub's holder name gets no desktop rights from it.
fn reserved(p: &str) -> ApiResult<()> {
    if p == HUB_HOLDER {
        return Err(ApiError::forbidden(format!(
            "the name {HUB_HOLDER:?} is reserved for the hub's own hold of desktops"
        )));
    }
    Ok(())
}

/// May point `p` read `image` because of a desktop it holds?
pub(crate) fn may_read(hub: &Hub, p: &str, image: &str) -> ApiResult<bool> {
    if p == HUB_HOLDER {
        return Ok(false);
    }
    for d in hub.db.desktops_held_by(p)? {
        if d.user_image == image {
            return Ok(true);
        }
        if channel_now(hub, &d.channel)?.is_some_and(|(i, _)| i == image) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// For a desktop's user image: whether point `p` may write it (`None`: `image` is
/// no desktop's, the ordinary ownership rules apply).
pub(crate) fn may_write(hub: &Hub, p: &str, image: &str) -> ApiResult<Option<ApiResult<()>>> {
    let Some(d) = hub.db.desktop_by_user_image(image)? else {
        return Ok(None);
    };
    if p != HUB_HOLDER && (holds(&d, p) || hub.db.held_before(&d.name, p)?) {
        return Ok(Some(Ok(())));
    }
    Ok(Some(Err(ApiError::forbidden(format!(
        "point {p:?} does not hold desktop {:?}",
        d.name
    )))))
}

/// A point that no longer holds the desktop writes only recovery branches.
pub(crate) fn check_branch(hub: &Hub, c: &Caller, image: &str, branch: &str) -> ApiResult<()> {
    let Caller::Point(p) = c else { return Ok(()) };
    let Some(d) = hub.db.desktop_by_user_image(image)? else {
        return Ok(());
    };
    if holds(&d, p) || (p != HUB_HOLDER && branch.starts_with(RECOVERY_PREFIX)) {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "desktop {:?} is checked out to {}; point {p:?} may push its changes only to a \
         {RECOVERY_PREFIX}... branch",
        d.name,
        d.holder.as_deref().unwrap_or("no point")
    )))
}

/// The desktop as every endpoint answers: [`DesktopInfo`] with the OS reset
/// requests and its holder's newest report.
fn detail(hub: &Hub, d: DesktopRow) -> ApiResult<DesktopDetail> {
    let point = match hub.db.desktop_report(&d.name)? {
        Some((p, received, json)) if d.holder.as_deref() == Some(p.as_str()) => {
            serde_json::from_str::<DesktopPointReport>(&json)
                .ok()
                .map(|report| DesktopPointStatus {
                    point: p,
                    received,
                    report,
                })
        }
        _ => None,
    };
    let (os_reset, os_reset_time, os_reset_by) =
        (d.os_reset, d.os_reset_time, d.os_reset_by.clone());
    Ok(DesktopDetail {
        info: info(hub, d)?,
        os_reset,
        os_reset_time,
        os_reset_by,
        point,
    })
}

fn info(hub: &Hub, d: DesktopRow) -> ApiResult<DesktopInfo> {
    let os = channel_now(hub, &d.channel)?;
    let user = hub
        .store
        .get_ref(&d.user_image, RefKind::Branch, "main")
        .ok()
        .flatten();
    let user_time = user.and_then(|v| hub.store.load_version(&v).ok().map(|v| v.time));
    let holder_last_seen = match &d.holder {
        Some(h) => hub.db.last_seen(h)?,
        None => None,
    };
    Ok(DesktopInfo {
        name: d.name,
        channel: d.channel,
        user_image: d.user_image,
        created: d.created,
        holder: d.holder,
        holder_since: d.holder_since,
        holder_last_seen,
        epoch: d.epoch,
        os_image: os.as_ref().map(|(i, _)| i.clone()),
        os_version: os.map(|(_, v)| v),
        user_version: user.map(|v| v.to_hex()),
        user_time,
    })
}

pub(crate) async fn create(
    State(hub): State<AppState>,
    c: Caller,
    Json(req): Json<CreateDesktopRequest>,
) -> ApiResult<Json<DesktopDetail>> {
    require_admin(&c)?;
    blocking(move || {
        strata_store::validate_name(&req.name)?;
        if hub.db.desktop(&req.name)?.is_some() {
            return Err(conflict(format!("desktop {:?} exists", req.name)));
        }
        if hub.db.channel_head(&req.channel)?.is_none() {
            return Err(ApiError::not_found(format!(
                "no channel named {:?} (publish a version to it first)",
                req.channel
            )));
        }
        let image = user_image(&req.name);
        match (&req.template, req.size) {
            (Some(t), None) => {
                let (ti, rev) = t.split_once('@').unwrap_or((t.as_str(), "main"));
                let v = hub.store.resolve(ti, Some(rev))?;
                hub.store.clone_image(&image, &v)?;
            }
            (None, Some(size)) if size > 0 => {
                let bs = req.block_size.unwrap_or(64 << 10);
                let mut session = WriteSession::begin(&hub.store, "desktop create")?;
                let mut draft = session.new_version(size, bs)?;
                // Never written: reads as zeros and stores nothing (uniform subtrees
                // are not even nodes).
                let unwritten = vec![strata_store::Entry::Unwritten; 1 << 16];
                let mut left = size.div_ceil(bs as u64);
                while left > 0 {
                    let n = left.min(unwritten.len() as u64) as usize;
                    session.add_entries(&mut draft, &unwritten[..n])?;
                    left -= n as u64;
                }
                session.commit(
                    draft,
                    &CommitTarget {
                        image: image.clone(),
                        branch: "main".into(),
                        expected: None,
                        create_image: true,
                        parents: Vec::new(),
                        author: c.actor(),
                        message: format!("empty user disk of desktop {}", req.name),
                    },
                )?;
            }
            _ => {
                return Err(ApiError::bad_request(
                    "give the user disk a size (bytes > 0) or a template, not both",
                ))
            }
        }
        let row = DesktopRow {
            name: req.name.clone(),
            channel: req.channel.clone(),
            user_image: image.clone(),
            created: now(),
            holder: None,
            holder_since: None,
            epoch: 0,
            os_reset: 0,
            os_reset_time: None,
            os_reset_by: None,
        };
        if !hub.db.create_desktop(&row)? {
            let _ = hub.store.delete_image(&image);
            return Err(conflict(format!("desktop {:?} exists", req.name)));
        }
        // Its history lives as restore points (see crate::retention).
        hub.store.set_history_by_refs(&image, true)?;
        if let Some(v) = hub.store.get_ref(&image, RefKind::Branch, "main")? {
            after_main_moved(&hub, &image, "main", &v)?;
        }
        hub.db.audit(
            &c.actor(),
            "desktop.create",
            &req.name,
            &format!("channel {}, user disk {image}", req.channel),
        )?;
        Ok(Json(detail(&hub, row)?))
    })
    .await
}

pub(crate) async fn list(
    State(hub): State<AppState>,
    c: Caller,
) -> ApiResult<Json<Vec<DesktopDetail>>> {
    blocking(move || {
        let rows = match &c {
            Caller::Admin => hub.db.desktops()?,
            Caller::Point(p) if p == HUB_HOLDER => Vec::new(),
            Caller::Point(p) => hub.db.desktops_held_by(p)?,
        };
        let out = rows
            .into_iter()
            .map(|d| detail(&hub, d))
            .collect::<ApiResult<_>>()?;
        Ok(Json(out))
    })
    .await
}

pub(crate) async fn show(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<DesktopDetail>> {
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        if let Caller::Point(p) = &c {
            reserved(p)?;
            if !holds(&d, p) && !hub.db.held_before(&name, p)? {
                return Err(ApiError::forbidden(format!(
                    "point {p:?} does not hold desktop {name:?}"
                )));
            }
        }
        Ok(Json(detail(&hub, d)?))
    })
    .await
}

pub(crate) async fn remove(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    require_admin(&c)?;
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        hub.db.delete_desktop(&name)?;
        // Its versions go at the next gc.
        match hub.store.delete_image(&d.user_image) {
            Ok(()) | Err(strata_store::StoreError::NoSuchImage(_)) => {}
            Err(e) => return Err(e.into()),
        }
        hub.db.audit(&c.actor(), "desktop.rm", &name, "")?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

fn held_elsewhere(hub: &Hub, d: &DesktopRow, hint: &str) -> ApiResult<ApiError> {
    let holder = d.holder.clone().unwrap_or_default();
    if holder == HUB_HOLDER {
        return Ok(conflict(format!(
            "desktop {} is served by the hub itself (`strata hub desktop serve --writable`; \
             stopping it releases the desktop){hint}",
            d.name
        )));
    }
    let seen = match hub.db.last_seen(&holder)? {
        Some(t) => format!("last contact {}s ago", (now() - t).max(0)),
        None => "never in contact".to_string(),
    };
    Ok(conflict(format!(
        "desktop {} is checked out to point {holder} ({seen}){hint}",
        d.name
    )))
}

pub(crate) async fn check_out(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<DesktopDetail>> {
    let Caller::Point(p) = c.clone() else {
        return Err(ApiError::bad_request(
            "operators hand desktops over with transfer; a point checks out",
        ));
    };
    reserved(&p)?;
    blocking(move || {
        if hub.db.desktop(&name)?.is_none() {
            return Err(no_desktop(&name));
        }
        match hub.db.check_out(&name, &p, false, &c.actor())? {
            Ok(d) => Ok(Json(detail(&hub, d)?)),
            Err(d) => Err(held_elsewhere(
                &hub,
                &d,
                "; an operator can move it with `strata desktop transfer --force`",
            )?),
        }
    })
    .await
}

pub(crate) async fn check_in(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<DesktopDetail>> {
    // An operator checks in for the hub: the end of `hub desktop serve --writable`.
    let holder = match &c {
        Caller::Point(p) => {
            reserved(p)?;
            p.clone()
        }
        Caller::Admin => HUB_HOLDER.to_string(),
    };
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        if !hub.db.check_in(&name, &holder, &c.actor())? {
            return Err(ApiError::forbidden(format!(
                "{} does not hold desktop {name:?} (holder: {})",
                match &c {
                    Caller::Point(p) => format!("point {p:?}"),
                    Caller::Admin => "the hub".to_string(),
                },
                d.holder.as_deref().unwrap_or("none")
            )));
        }
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        Ok(Json(detail(&hub, d)?))
    })
    .await
}

pub(crate) async fn transfer(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    Json(req): Json<TransferRequest>,
) -> ApiResult<Json<DesktopDetail>> {
    require_admin(&c)?;
    blocking(move || {
        if hub.db.desktop(&name)?.is_none() {
            return Err(no_desktop(&name));
        }
        // The hub itself may hold a desktop (to serve it writable); it is no point.
        if req.point != HUB_HOLDER && !hub.db.point_exists(&req.point)? {
            return Err(ApiError::not_found(format!(
                "no point named {:?}",
                req.point
            )));
        }
        match hub.db.check_out(&name, &req.point, req.force, &c.actor())? {
            Ok(d) => Ok(Json(detail(&hub, d)?)),
            Err(d) => Err(held_elsewhere(&hub, &d, "; add --force to take it")?),
        }
    })
    .await
}

/// After a desktop's user disk moved its `main` to `v`: tag `v` as a restore point
/// and prune the restore points by the hub's retention policy.
pub(crate) fn after_main_moved(
    hub: &Hub,
    image: &str,
    branch: &str,
    v: &strata_store::VersionId,
) -> ApiResult<()> {
    if branch != "main" || hub.db.desktop_by_user_image(image)?.is_none() {
        return Ok(());
    }
    crate::retention::add_restore_point(&hub.store, image, v)?;
    let pruned = crate::retention::prune(&hub.store, image, &hub.retention)?;
    if pruned > 0 {
        tracing::info!(%image, pruned, "restore points pruned by the retention policy");
    }
    Ok(())
}

pub(crate) async fn restore_points(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<RestorePoint>>> {
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        if let Caller::Point(p) = &c {
            if !holds(&d, p) {
                return Err(ApiError::forbidden(format!(
                    "point {p:?} does not hold desktop {name:?}"
                )));
            }
        }
        Ok(Json(
            crate::retention::restore_points(&hub.store, &d.user_image)?
                .into_iter()
                .map(|(time, tag, v)| RestorePoint {
                    time,
                    tag,
                    version: v.to_hex(),
                })
                .collect(),
        ))
    })
    .await
}

/// A time given as Unix seconds or RFC 3339.
fn parse_time(s: &str) -> Option<i64> {
    if let Ok(t) = s.parse::<i64>() {
        return Some(t);
    }
    let t = humantime::parse_rfc3339_weak(s).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

pub(crate) async fn restore(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    Json(req): Json<RestoreRequest>,
) -> ApiResult<Json<RestoreResponse>> {
    require_admin(&c)?;
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        let image = d.user_image.clone();
        let current = hub
            .store
            .get_ref(&image, RefKind::Branch, "main")?
            .ok_or_else(|| ApiError::not_found(format!("{image} has no main")))?;
        let target = match parse_time(&req.to) {
            Some(t) => crate::retention::restore_points(&hub.store, &image)?
                .into_iter()
                .find(|(time, _, _)| *time <= t)
                .map(|(_, _, v)| v)
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "desktop {name} has no restore point at or before {}",
                        req.to
                    ))
                })?,
            None => hub.store.resolve(&image, Some(&req.to))?,
        };
        let from = hub.store.load_version(&target)?;
        // A new version with the restore point's content whose parent is the current
        // state: the restore is itself undoable (restore to `previous`).
        let record = strata_store::Version {
            parents: vec![current.to_hex()],
            time: now(),
            author: c.actor(),
            message: format!("restore to {}", target.short()),
            image: image.clone(),
            ..from
        };
        let raw = record.encode();
        let vid = strata_store::ChunkId::for_object(strata_store::ObjectKind::Version, &raw);
        let mut session = WriteSession::begin(&hub.store, "desktop restore")?;
        session.add_received(&[(strata_store::ObjectKind::Version, vid, raw.as_slice())])?;
        session.commit_received(
            &vid,
            &strata_store::BranchUpdate {
                image: image.clone(),
                branch: "main".into(),
                expected: Some(current),
                create_image: false,
            },
        )?;
        after_main_moved(&hub, &image, "main", &vid)?;
        hub.db.audit(
            &c.actor(),
            "desktop.restore",
            &name,
            &format!("to {} (was {})", target.to_hex(), current.to_hex()),
        )?;
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        Ok(Json(RestoreResponse {
            desktop: info(&hub, d)?,
            restored_from: target.to_hex(),
            previous: current.to_hex(),
            version: vid.to_hex(),
        }))
    })
    .await
}

pub(crate) async fn reset_os(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<DesktopDetail>> {
    require_admin(&c)?;
    blocking(move || {
        let d = hub
            .db
            .request_os_reset(&name, &c.actor())?
            .ok_or_else(|| no_desktop(&name))?;
        Ok(Json(detail(&hub, d)?))
    })
    .await
}

pub(crate) async fn report(
    State(hub): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
    Json(report): Json<DesktopPointReport>,
) -> ApiResult<StatusCode> {
    let Caller::Point(p) = c else {
        return Err(ApiError::bad_request("only the holding point reports"));
    };
    reserved(&p)?;
    blocking(move || {
        let d = hub.db.desktop(&name)?.ok_or_else(|| no_desktop(&name))?;
        if !holds(&d, &p) {
            // How a point that lost the desktop learns it (see the module docs).
            return Err(ApiError::forbidden(format!(
                "desktop {name:?} is checked out to {}, not to point {p:?}",
                d.holder.as_deref().unwrap_or("no one")
            )));
        }
        let json = serde_json::to_string(&report).map_err(ApiError::internal)?;
        hub.db.put_desktop_report(&name, &p, now(), &json)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}
