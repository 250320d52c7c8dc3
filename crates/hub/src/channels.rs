//! Channels: release stages of gold images (`win11/dev` → `win11/staging` →
//! `win11/production`).
//!
//! A channel is a named pointer to a version of an image, with history. Its state is
//! its log in the metadata database ([`crate::db::MetaDb::channel_log`]): every
//! publish, promote and rollback appends one entry, and the newest entry is where the
//! channel points. Appending checks the log's last sequence number in the same
//! transaction (compare-and-swap), so concurrent operators never interleave: one
//! wins, the others retry against the new state or, if they named the state they
//! expected (`expected_seq`), get 409. The audit entry is written in that same
//! transaction.
//!
//! **Rollback** replays the log as a stack: publish and promote push a version,
//! rollback pops one; the channel returns to the version below the top. Repeated
//! rollbacks therefore keep going back through what was published, not back and
//! forth between two versions.
//!
//! **gc.** Each entry's version is held in the hub's store by a tag
//! `channel/<channel>/<seq>.<nonce>` on its image, made before the entry is appended
//! (and removed if the append loses), so every version a channel has pointed at
//! stays restorable; a crash between the two leaves only an extra tag.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use strata_store::{RefKind, VersionId};
use strata_sync::api::{
    ChannelInfo, ChannelLogEntry, PromoteRequest, PublishRequest, RollbackRequest,
};

use crate::db::now;
use crate::routes::{blocking, can_read, require_admin, ApiError, ApiResult, AppState, Caller};
use crate::Hub;

/// Compare-and-swap rounds an operation that named no expected state retries.
const MAX_ROUNDS: usize = 32;

fn conflict(msg: String) -> ApiError {
    ApiError::new(axum::http::StatusCode::CONFLICT, "conflict", msg)
}

/// Where the log says the channel points, as a stack (see the module doc).
fn stack(log: &[ChannelLogEntry]) -> Vec<(String, String)> {
    let mut st = Vec::new();
    for e in log {
        if e.action == "rollback" {
            st.pop();
        } else {
            st.push((e.image.clone(), e.version.clone()));
        }
    }
    st
}

fn info(channel: &str, e: &ChannelLogEntry) -> ChannelInfo {
    ChannelInfo {
        name: channel.to_string(),
        image: e.image.clone(),
        version: e.version.clone(),
        seq: e.seq,
        time: e.time,
        actor: e.actor.clone(),
    }
}

/// What an operation moves a channel to, decided from its log: (image, version,
/// detail for the log).
type Target<'a> = dyn Fn(&[ChannelLogEntry]) -> ApiResult<(String, VersionId, String)> + 'a;

/// Move `channel` to what `target` decides from its current log, by compare-and-swap.
fn move_channel(
    hub: &Hub,
    c: &Caller,
    channel: &str,
    action: &str,
    expected: Option<i64>,
    target: &Target,
) -> ApiResult<ChannelInfo> {
    strata_store::validate_name(channel)?;
    for _ in 0..MAX_ROUNDS {
        let log = hub.db.channel_log(channel)?;
        let last = log.last();
        let seq = last.map_or(0, |e| e.seq);
        if let Some(want) = expected {
            if want != seq {
                return Err(conflict(format!(
                    "channel {channel} is at #{seq}{}, not #{want}",
                    last.map(|e| format!(" ({}@{})", e.image, &e.version[..12]))
                        .unwrap_or_default()
                )));
            }
        }
        let (image, vid, detail) = target(&log)?;
        // Unique to this attempt: operators racing for the same sequence number each
        // tag, the losers remove only their own tags.
        let nonce = &crate::random_secret("")[..8];
        let tag = format!("channel/{channel}/{}.{nonce}", seq + 1);
        hub.store.create_ref(&image, RefKind::Tag, &tag, &vid)?;
        let entry = ChannelLogEntry {
            seq: seq + 1,
            time: now(),
            actor: c.actor(),
            action: action.to_string(),
            image,
            version: vid.to_hex(),
            previous: last.map(|e| e.version.clone()),
            detail,
        };
        if hub.db.channel_append(channel, &entry)? {
            // Points will hold this version when the channel next moves: index its
            // pages now, ahead of that rollout.
            hub.pages.prepare(&hub.store, vid);
            return Ok(info(channel, &entry));
        }
        let _ = hub.store.delete_ref(&entry.image, RefKind::Tag, &tag);
        if expected.is_some() {
            return Err(conflict(format!(
                "channel {channel} moved while this {action} was being made"
            )));
        }
    }
    Err(conflict(format!(
        "channel {channel} kept moving; gave up after {MAX_ROUNDS} attempts"
    )))
}

fn current(log: &[ChannelLogEntry], channel: &str) -> ApiResult<(String, VersionId)> {
    let e = log
        .last()
        .ok_or_else(|| ApiError::not_found(format!("no channel named {channel:?}")))?;
    let v = VersionId::from_hex(&e.version).ok_or_else(|| ApiError::internal("bad version id"))?;
    Ok((e.image.clone(), v))
}

pub(crate) async fn list(
    State(hub): State<AppState>,
    c: Caller,
) -> ApiResult<Json<Vec<ChannelInfo>>> {
    blocking(move || {
        let mut out = Vec::new();
        for ch in hub.db.channels()? {
            if can_read(&hub, &c, &ch.image)? {
                out.push(ch);
            }
        }
        Ok(Json(out))
    })
    .await
}

#[derive(Deserialize)]
pub(crate) struct NameQuery {
    name: String,
}

pub(crate) async fn log(
    State(hub): State<AppState>,
    c: Caller,
    Query(q): Query<NameQuery>,
) -> ApiResult<Json<Vec<ChannelLogEntry>>> {
    blocking(move || {
        let log = hub.db.channel_log(&q.name)?;
        let (image, _) = current(&log, &q.name)?;
        if !can_read(&hub, &c, &image)? {
            return Err(ApiError::forbidden(format!(
                "{} may not read channel {:?}",
                c.actor(),
                q.name
            )));
        }
        Ok(Json(log))
    })
    .await
}

pub(crate) async fn publish(
    State(hub): State<AppState>,
    c: Caller,
    Json(req): Json<PublishRequest>,
) -> ApiResult<Json<ChannelInfo>> {
    require_admin(&c)?;
    blocking(move || {
        let vid = hub.store.resolve(&req.image, Some(&req.rev))?;
        let target = |_: &[ChannelLogEntry]| Ok((req.image.clone(), vid, String::new()));
        Ok(Json(move_channel(
            &hub,
            &c,
            &req.channel,
            "publish",
            req.expected_seq,
            &target,
        )?))
    })
    .await
}

pub(crate) async fn promote(
    State(hub): State<AppState>,
    c: Caller,
    Json(req): Json<PromoteRequest>,
) -> ApiResult<Json<ChannelInfo>> {
    require_admin(&c)?;
    if req.from == req.to {
        return Err(ApiError::bad_request(
            "promote needs two different channels",
        ));
    }
    blocking(move || {
        // Read inside each round: a promote takes what `from` points at when it lands.
        let target = |_: &[ChannelLogEntry]| {
            let (image, v) = current(&hub.db.channel_log(&req.from)?, &req.from)?;
            Ok((image, v, format!("from {}", req.from)))
        };
        Ok(Json(move_channel(
            &hub,
            &c,
            &req.to,
            "promote",
            req.expected_seq,
            &target,
        )?))
    })
    .await
}

pub(crate) async fn rollback(
    State(hub): State<AppState>,
    c: Caller,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<Json<ChannelInfo>> {
    require_admin(&c)?;
    blocking(move || {
        let channel = req.channel.clone();
        let target = |log: &[ChannelLogEntry]| {
            current(log, &channel)?;
            let st = stack(log);
            let (image, version) =
                st.len()
                    .checked_sub(2)
                    .map(|i| st[i].clone())
                    .ok_or_else(|| {
                        conflict(format!(
                            "channel {channel} has no earlier version to roll back to"
                        ))
                    })?;
            let v = VersionId::from_hex(&version).ok_or_else(|| ApiError::internal("bad id"))?;
            Ok((image, v, String::new()))
        };
        Ok(Json(move_channel(
            &hub,
            &c,
            &req.channel,
            "rollback",
            req.expected_seq,
            &target,
        )?))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: i64, action: &str, v: &str) -> ChannelLogEntry {
        ChannelLogEntry {
            seq,
            time: 0,
            actor: "admin".into(),
            action: action.into(),
            image: "gold".into(),
            version: v.into(),
            previous: None,
            detail: String::new(),
        }
    }

    #[test]
    fn rollbacks_walk_back_through_what_was_published() {
        let log = vec![
            e(1, "publish", "a"),
            e(2, "publish", "b"),
            e(3, "promote", "c"),
            e(4, "rollback", "b"),
        ];
        let st = stack(&log);
        assert_eq!(st.last().unwrap().1, "b");
        assert_eq!(
            st[st.len() - 2].1,
            "a",
            "a second rollback goes to a, not c"
        );
    }
}
