//! Types of the hub's HTTP API (`docs/hub-api.yaml`), shared by the hub and its
//! clients so that both ends agree by construction.
//!
//! JSON for metadata; binary bodies for ids and objects:
//!
//! * id list (`application/octet-stream`): ids of 32 bytes, concatenated;
//! * want list (download request): records of 64 bytes, `id:[32] base:[32]`, where
//!   `base` is an object the client holds and would like a delta against (all zero:
//!   none);
//! * object stream (`application/x-strata-objects`): see [`crate::frame`].

use serde::{Deserialize, Serialize};
use strata_store::ChunkId;

/// Path prefix of every endpoint.
pub const API_PREFIX: &str = "/v1";
pub const OBJECTS_CONTENT_TYPE: &str = "application/x-strata-objects";
/// At most this many ids in one missing query or download request.
pub const MAX_IDS_PER_REQUEST: usize = 1 << 16;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The point's name (chosen by the operator who made the token).
    pub point: String,
    /// The point's bearer credential; the hub keeps only its hash.
    pub credential: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefEntry {
    pub name: String,
    /// Version id (hex).
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub block_size: u32,
    /// The point that owns (may write) the image; `None` for the operators' images.
    pub owner: Option<String>,
    /// Whether the caller may write it.
    pub writable: bool,
    pub branches: Vec<RefEntry>,
    pub tags: Vec<RefEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionResponse {
    /// Version id (hex).
    pub id: String,
    /// The version record, exactly the bytes the id hashes (a JSON document as text).
    pub record: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UploadCreated {
    pub upload: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UploadReport {
    /// Objects in the body.
    pub objects: u64,
    /// Of those, objects the hub did not hold yet.
    pub new_objects: u64,
    /// Uncompressed object bytes (after resolving deltas).
    pub raw_bytes: u64,
}

/// Move a branch by compare-and-swap.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CasRequest {
    /// The version the branch must point at now (hex); `None`: it must not exist.
    pub expected: Option<String>,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitRequest {
    pub branch: String,
    pub expected: Option<String>,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RefUpdated {
    pub image: String,
    pub branch: String,
    pub version: String,
}

/// Every error response.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable: unauthorized, forbidden, not_found, conflict, bad_object,
    /// missing_object, bad_request, internal.
    pub code: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentRequest {
    /// The name the point will have.
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub name: String,
    pub token: String,
    /// Seconds since the epoch after which the token is void.
    pub expires: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub point: String,
    pub image: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PointInfo {
    pub name: String,
    pub enrolled: i64,
    pub revoked: bool,
    pub last_seen: Option<i64>,
    /// Images granted for reading.
    pub grants: Vec<String>,
    /// Images it owns (may write).
    pub owns: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub time: i64,
    /// `admin` or `point:NAME`.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

pub fn encode_ids(ids: &[ChunkId]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        b.extend_from_slice(&id.0);
    }
    b
}

pub fn decode_ids(b: &[u8]) -> Option<Vec<ChunkId>> {
    if !b.len().is_multiple_of(32) || b.len() / 32 > MAX_IDS_PER_REQUEST {
        return None;
    }
    Some(b.chunks_exact(32).filter_map(ChunkId::from_slice).collect())
}

/// One object asked for in a download, with the base the client would like a delta
/// against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub id: ChunkId,
    pub base: Option<ChunkId>,
}

pub fn encode_wants(wants: &[Want]) -> Vec<u8> {
    let mut b = Vec::with_capacity(wants.len() * 64);
    for w in wants {
        b.extend_from_slice(&w.id.0);
        b.extend_from_slice(&w.base.map_or([0; 32], |b| b.0));
    }
    b
}

pub fn decode_wants(b: &[u8]) -> Option<Vec<Want>> {
    if !b.len().is_multiple_of(64) || b.len() / 64 > MAX_IDS_PER_REQUEST {
        return None;
    }
    Some(
        b.chunks_exact(64)
            .map(|r| Want {
                id: ChunkId::from_slice(&r[..32]).expect("32 bytes"),
                base: Some(ChunkId::from_slice(&r[32..]).expect("32 bytes"))
                    .filter(|b| b.0 != [0; 32]),
            })
            .collect(),
    )
}

// ---- channels ------------------------------------------------------------------------

/// A channel: a named pointer to a version of a gold image (`win11/production`),
/// moved only by publish, promote and rollback, each an entry of its log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelInfo {
    pub name: String,
    pub image: String,
    /// The version it points at (hex).
    pub version: String,
    /// Its log's last sequence number: the value compare-and-swap expects.
    pub seq: i64,
    pub time: i64,
    pub actor: String,
}

/// One change of a channel.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelLogEntry {
    pub seq: i64,
    pub time: i64,
    /// `admin` or `point:NAME`.
    pub actor: String,
    /// `publish`, `promote` or `rollback`.
    pub action: String,
    pub image: String,
    pub version: String,
    /// The version it pointed at before (hex), if any.
    pub previous: Option<String>,
    /// For a promote: the channel it came from.
    pub detail: String,
}

/// Publish `image@rev` to `channel`. With `expected_seq`, only if the channel's log
/// is still at that sequence number (0: the channel must not exist yet).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublishRequest {
    pub channel: String,
    pub image: String,
    pub rev: String,
    #[serde(default)]
    pub expected_seq: Option<i64>,
}

/// Point channel `to` at what channel `from` points at now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PromoteRequest {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub expected_seq: Option<i64>,
}

/// Return `channel` to the version it had before its current one.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub channel: String,
    #[serde(default)]
    pub expected_seq: Option<i64>,
}

// ---- desktops ------------------------------------------------------------------------

/// A desktop: an OS disk that follows a channel, a user disk of its own (an image on
/// the hub), and at most one point it is checked out to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesktopInfo {
    pub name: String,
    pub channel: String,
    /// The hub image holding the user disk's versions.
    pub user_image: String,
    pub created: i64,
    /// The point it is checked out to, since when, and that point's last contact.
    pub holder: Option<String>,
    pub holder_since: Option<i64>,
    pub holder_last_seen: Option<i64>,
    /// Bumped by every change of holder (a point that holds an older epoch lost it).
    pub epoch: i64,
    /// Where the channel points now: the OS disk's image and version (hex).
    pub os_image: Option<String>,
    pub os_version: Option<String>,
    /// The user disk's newest synced version on the hub (hex) and when it was made.
    pub user_version: Option<String>,
    pub user_time: Option<i64>,
}

/// Make a desktop: its user disk empty of `size` bytes, or a copy of `template`
/// (`IMAGE@REV` on the hub).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateDesktopRequest {
    pub name: String,
    pub channel: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub block_size: Option<u32>,
}

/// Hand a desktop to `point`; `force` takes it from a current holder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TransferRequest {
    pub point: String,
    #[serde(default)]
    pub force: bool,
}

/// Roll a desktop's user disk back: `to` is a version (id, prefix, tag) of the user
/// image, or a time (Unix seconds or RFC 3339): the newest restore point at or
/// before it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub to: String,
}

/// A kept version of a desktop's user disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestorePoint {
    pub time: i64,
    pub tag: String,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreResponse {
    pub desktop: DesktopInfo,
    /// The restore point whose content the new version has (hex).
    pub restored_from: String,
    /// `main` before the restore (hex): restoring to it undoes the restore.
    pub previous: String,
    /// The new version on `main` (hex).
    pub version: String,
}

/// The holder a desktop has while the hub itself serves it writable
/// (`strata hub desktop serve NAME --writable`). No point may act under this name.
pub const HUB_HOLDER: &str = "hub";

/// What the point holding a desktop reports of it (`POST /v1/desktops/{name}/report`,
/// sent in each sync round): what it runs, what it has that the hub lacks.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesktopPointReport {
    /// When the point made the report (its clock, seconds since the epoch).
    pub time: i64,
    /// The channel version its OS disk runs (hex), and the OS reset generation it
    /// applied (see [`DesktopDetail::os_reset`]).
    #[serde(default)]
    pub os_version: Option<String>,
    #[serde(default)]
    pub os_reset: i64,
    /// Its user disk: the newest local version (hex) and when it was made, and the
    /// version last pushed (the hub's tip as the point last knew it).
    #[serde(default)]
    pub user_version: Option<String>,
    #[serde(default)]
    pub last_commit: Option<i64>,
    #[serde(default)]
    pub user_pushed: Option<String>,
    /// When it last pushed the user disk, and when a sync round last reached the
    /// hub for every session.
    #[serde(default)]
    pub last_push: Option<i64>,
    #[serde(default)]
    pub last_sync: Option<i64>,
    /// Bytes of the user disk the hub lacks: changed in local versions not pushed
    /// yet, plus written to the session since its last commit (whole blocks, as of
    /// its last flush); `pending_bytes` is their sum.
    #[serde(default)]
    pub unpushed_bytes: u64,
    #[serde(default)]
    pub uncommitted_bytes: u64,
    #[serde(default)]
    pub pending_bytes: u64,
    /// The user disk's base is still being streamed from the hub (nothing is
    /// committed until it is local).
    #[serde(default)]
    pub streaming: bool,
}

/// The newest report of a desktop's holder, as the hub keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesktopPointStatus {
    pub point: String,
    /// When the hub received it (the hub's clock).
    pub received: i64,
    #[serde(flatten)]
    pub report: DesktopPointReport,
}

/// [`DesktopInfo`] with the OS reset requests and what the holder last reported.
/// Every desktop endpoint answers with this; clients that know only `DesktopInfo`
/// read it as one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesktopDetail {
    #[serde(flatten)]
    pub info: DesktopInfo,
    /// OS resets requested by operators so far (`strata desktop reset-os`): the
    /// holder drops the OS disk's delta at its next start when it applied fewer.
    #[serde(default)]
    pub os_reset: i64,
    #[serde(default)]
    pub os_reset_time: Option<i64>,
    #[serde(default)]
    pub os_reset_by: Option<String>,
    /// The holder's newest report (none from a former holder).
    #[serde(default)]
    pub point: Option<DesktopPointStatus>,
}
