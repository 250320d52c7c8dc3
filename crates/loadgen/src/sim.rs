//! Simulated points: their setup through the operators' API, and one check-in.
//!
//! **Setup** is what an operator and a point do for a real desktop, request for
//! request: `strata hub enroll NAME` (a one-time token), `strata point enroll`
//! (the token for a credential), `strata desktop create NAME --channel C
//! --template T` (a user disk starting as a copy of a template that holds some
//! data, so that check-ins rewrite blocks that had content, as in a disk that has
//! been in use for a while; `--size S`, an empty disk, when the fill is 0) and the
//! point's check-out (`point desktop start`'s first request). The pulls of
//! `point desktop start` are left out: the shared local store already holds the
//! gold and template versions, as a point that has started its desktop once
//! would; the benchmark is about the steady state.
//!
//! **A check-in** is the network part of the agent's sync round for a desktop
//! (`strata_point::Point::sync`): commit the user disk's session into a new
//! local version (here: a few rewritten blocks over the last version); report the
//! desktop to the hub (what it runs, what the hub lacks: `report_desktop`); push the
//! version with [`strata_sync::push`] — the real client code: begin an upload, ask
//! which objects the hub lacks top down, send them (as deltas where the previous
//! version at the same place helps), commit with compare-and-swap against the hub
//! tip the point last knew —; report again (nothing pending now); and ask the hub
//! for the point's desktops to learn whether the channel moved (the agent's
//! `prefetch_channels`). Each check-in makes a new
//! client, so a new connection (and TLS handshake on https), as a real point whose
//! idle connection the pool closed after 90 s does at a 15-minute interval.
//!
//! The client side of every simulated point shares one local store: the versions a
//! point builds and pushes are real store objects, read by the real push, without
//! a store per point. Only the tip of each point's user disk is kept (history by
//! refs, and a local gc between steps), so it stays small.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use strata_store::tree::{self, Span};
use strata_store::{BlockInput, CommitTarget, Entry, RefKind, Store, VersionId, WriteSession};
use strata_sync::api::{CreateDesktopRequest, DesktopPointReport, PublishRequest};
use strata_sync::{ClientConfig, Expect, HubClient, PushOptions};

use crate::content::Writes;

/// How to reach the hub.
#[derive(Clone)]
pub struct HubAccess {
    pub url: String,
    pub admin_token: String,
    pub ca_pem: Option<Vec<u8>>,
}

impl HubAccess {
    fn config(&self, credential: Option<&str>) -> ClientConfig {
        let mut cfg = ClientConfig::new(&self.url);
        cfg.credential = credential.map(str::to_string);
        cfg.ca_pem = self.ca_pem.clone();
        cfg
    }

    pub fn admin(&self) -> Result<HubClient> {
        Ok(HubClient::new(&self.config(Some(&self.admin_token)))?)
    }

    pub fn anonymous(&self) -> Result<HubClient> {
        Ok(HubClient::new(&self.config(None))?)
    }

    /// A fresh client (its own connections) with a point's credential.
    pub fn point(&self, credential: &str) -> Result<HubClient> {
        Ok(HubClient::new(&self.config(Some(credential)))?)
    }
}

/// What every simulated point shares.
pub struct Sim {
    pub hub: HubAccess,
    pub local: Arc<Store>,
    pub prefix: String,
    pub channel: String,
    pub disk_size: u64,
    pub writes: Writes,
    /// The channel's version (hex), as set up.
    pub gold_version: String,
    /// Report the desktop before and after the push, as the agent does.
    pub report: bool,
    /// The user disks' template on the hub and in the local store (`None`: the
    /// desktops start with empty disks).
    pub template: Option<VersionId>,
}

/// One simulated point: what a real one keeps in its `point.json`, its credential
/// file and its store's refs.
pub struct PointSim {
    pub index: u64,
    pub name: String,
    pub credential: String,
    /// The version its user disk started from (the template's, or the empty
    /// disk's the hub made).
    pub origin: VersionId,
    /// The hub's tip of its user disk as of its last successful push.
    pub hub_tip: VersionId,
    /// Its local tip (`None` before the first check-in: the local store has nothing).
    pub local_tip: Option<VersionId>,
    /// Check-ins made.
    pub generation: u64,
    /// When it last pushed and last completed a round (its clock).
    pub last_push: Option<i64>,
    pub last_sync: Option<i64>,
}

impl Sim {
    pub fn desktop(&self, index: u64) -> String {
        format!("{}-{index:06}", self.prefix)
    }

    pub fn user_image(desktop: &str) -> String {
        format!("desktops/{desktop}/user")
    }
}

/// Make an image of `size` bytes in the local store whose blocks `fill(b)` hold
/// data (the rest never written), push it to the hub as the operator does
/// (`strata hub push`), and return its version.
async fn push_image(
    hub: &HubAccess,
    local: &Store,
    image: &str,
    size: u64,
    writes: &Writes,
    fill: impl Fn(u64) -> bool,
) -> Result<VersionId> {
    let bs = writes.block_size as u64;
    let blocks = size.div_ceil(bs);
    let vid = {
        let mut s = WriteSession::begin(local, "strata-load setup")?;
        let mut draft = s.new_version(size, bs as u32)?;
        let input: Vec<BlockInput> = (0..blocks)
            .map(|b| {
                if fill(b) {
                    BlockInput::Data(writes.block(u64::MAX, 0, b))
                } else {
                    BlockInput::Unwritten
                }
            })
            .collect();
        s.add_blocks(&mut draft, input)?;
        let (vid, _, _) = s.commit(
            draft,
            &CommitTarget {
                image: image.to_string(),
                branch: "main".into(),
                expected: local.get_ref(image, RefKind::Branch, "main").ok().flatten(),
                create_image: true,
                parents: Vec::new(),
                author: "strata-load".into(),
                message: "made by strata-load for the scale benchmark".into(),
            },
        )?;
        vid
    };
    let admin = hub.admin()?;
    strata_sync::push(local, &admin, image, "main", &vid, &PushOptions::default())
        .await
        .with_context(|| format!("pushing {image}"))?;
    Ok(vid)
}

/// Make the gold image (one block in sixteen holds data: its content matters to
/// nobody here, check-ins never touch it), push it and publish it to the channel.
/// Returns the version (hex).
pub async fn publish_gold(
    hub: &HubAccess,
    local: &Store,
    prefix: &str,
    channel: &str,
    size: u64,
    writes: &Writes,
) -> Result<String> {
    let image = format!("{prefix}-gold");
    let vid = push_image(hub, local, &image, size, writes, |b| b % 16 == 0).await?;
    hub.admin()?
        .publish(&PublishRequest {
            channel: channel.to_string(),
            image,
            rev: vid.to_hex(),
            expected_seq: None,
        })
        .await
        .context("publishing the gold version")?;
    Ok(vid.to_hex())
}

/// Make the user disks' template: `fill` of its blocks (spread evenly) hold data.
pub async fn push_template(
    hub: &HubAccess,
    local: &Store,
    prefix: &str,
    size: u64,
    fill: f64,
    writes: &Writes,
) -> Result<VersionId> {
    let image = format!("{prefix}-user-template");
    // Block b holds data when the running count of fill * b steps up there.
    let holds = |b: u64| ((b + 1) as f64 * fill).floor() > (b as f64 * fill).floor();
    push_image(hub, local, &image, size, writes, holds).await
}

/// Enrol point `index`, create its desktop and check it out to it.
pub async fn setup_point(
    sim: &Sim,
    admin: &HubClient,
    anon: &HubClient,
    index: u64,
) -> Result<PointSim> {
    let name = sim.desktop(index);
    let token = admin
        .create_enrollment(&name)
        .await
        .with_context(|| format!("enrolment token for {name}"))?;
    let enrolled = anon
        .enroll(&token.token)
        .await
        .with_context(|| format!("enrolling {name}"))?;
    let template = sim
        .template
        .map(|v| format!("{}-user-template@{}", sim.prefix, v.to_hex()));
    admin
        .create_desktop(&CreateDesktopRequest {
            name: name.clone(),
            channel: sim.channel.clone(),
            size: template.is_none().then_some(sim.disk_size),
            block_size: template.is_none().then_some(sim.writes.block_size as u32),
            template,
        })
        .await
        .with_context(|| format!("creating desktop {name}"))?;
    let client = sim.hub.point(&enrolled.credential)?;
    let d = client
        .check_out(&name)
        .await
        .with_context(|| format!("checking out {name}"))?;
    let tip = d
        .user_version
        .as_deref()
        .and_then(VersionId::from_hex)
        .ok_or_else(|| anyhow!("desktop {name} has no user disk version"))?;
    Ok(PointSim {
        index,
        name,
        credential: enrolled.credential,
        origin: tip,
        hub_tip: tip,
        local_tip: None,
        generation: 0,
        last_push: None,
        last_sync: None,
    })
}

/// What one check-in did and took.
#[derive(Clone, Debug, Default)]
pub struct CheckinResult {
    pub error: Option<String>,
    /// Seconds: the local commit (not the hub's work), then the hub's part: the
    /// two reports, the push and the channel question, and all of it together (the
    /// latency).
    pub commit_s: f64,
    pub report_s: f64,
    pub push_s: f64,
    pub query_s: f64,
    pub latency_s: f64,
    /// Bytes of request and response bodies.
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Objects the push sent, their uncompressed bytes, and deltas among them.
    pub objects: u64,
    pub logical_bytes: u64,
    pub deltas: u64,
    /// The channel was somewhere else than where it was published (never, here).
    pub channel_moved: bool,
}

/// The entries of every block of version `v` of the local store.
fn entries_of(local: &Store, v: &VersionId, blocks: u64) -> Result<Vec<Entry>> {
    let ver = local.load_version(v)?;
    let mut out = Vec::with_capacity(blocks as usize);
    let mut load = |id: &strata_store::ChunkId| local.load_node(id).map_err(|e| e.to_string());
    tree::walk(
        &mut load,
        ver.root_entry().map_err(|e| anyhow!(e))?,
        ver.depth,
        0,
        blocks,
        &mut |s| {
            match s {
                Span::Uniform { count, entry, .. } => {
                    out.extend(std::iter::repeat_n(entry, count as usize))
                }
                Span::Blocks { entries, .. } => out.extend_from_slice(entries),
            }
            Ok::<(), String>(())
        },
    )
    .map_err(|e| anyhow!(e))?;
    Ok(out)
}

/// Commit point `p`'s next version locally: its last version with this check-in's
/// blocks rewritten (what the agent's commit of the user disk's session makes).
pub fn commit_local(sim: &Sim, p: &PointSim) -> Result<VersionId> {
    let image = Sim::user_image(&p.name);
    let w = &sim.writes;
    let base = match (&p.local_tip, &sim.template) {
        (Some(v), _) => entries_of(&sim.local, v, w.blocks)?,
        // The template, which the local store holds.
        (None, Some(_)) => entries_of(&sim.local, &p.origin, w.blocks)?,
        // The hub's empty user disk: never written.
        (None, None) => vec![Entry::Unwritten; w.blocks as usize],
    };
    if base.len() as u64 != w.blocks {
        bail!(
            "{image}: {} blocks locally, expected {}",
            base.len(),
            w.blocks
        );
    }
    let changed = w.positions(p.index, p.generation);
    let mut s = WriteSession::begin(&sim.local, "strata-load check-in")?;
    let mut draft = s.new_version(sim.disk_size, w.block_size as u32)?;
    let mut next = 0u64;
    for &b in &changed {
        if b > next {
            s.add_entries(&mut draft, &base[next as usize..b as usize])?;
        }
        s.add_blocks(
            &mut draft,
            vec![BlockInput::Data(w.block(p.index, p.generation, b))],
        )?;
        next = b + 1;
    }
    if next < w.blocks {
        s.add_entries(&mut draft, &base[next as usize..])?;
    }
    let (vid, _, _) = s.commit(
        draft,
        &CommitTarget {
            image: image.clone(),
            branch: "main".into(),
            expected: p.local_tip,
            create_image: p.local_tip.is_none(),
            parents: vec![p.local_tip.unwrap_or(p.hub_tip)],
            author: format!("point:{}", p.name),
            message: format!("check-in {}", p.generation + 1),
        },
    )?;
    if p.local_tip.is_none() {
        // Keep only what refs name, so a local gc between steps leaves each point's
        // tip alone.
        sim.local.set_history_by_refs(&image, true)?;
    }
    Ok(vid)
}

/// One check-in of point `p` (see the module doc). On success the point's tips
/// advance; on failure the local tip still does (the commit happened), the hub tip
/// stays what the point last knew, as for a real point.
pub async fn check_in(sim: Arc<Sim>, p: &mut PointSim) -> CheckinResult {
    let mut r = CheckinResult::default();
    let t0 = Instant::now();
    let committed = {
        let sim2 = sim.clone();
        let snapshot = PointSim {
            index: p.index,
            name: p.name.clone(),
            credential: String::new(),
            origin: p.origin,
            hub_tip: p.hub_tip,
            local_tip: p.local_tip,
            generation: p.generation,
            last_push: None,
            last_sync: None,
        };
        tokio::task::spawn_blocking(move || commit_local(&sim2, &snapshot)).await
    };
    r.commit_s = t0.elapsed().as_secs_f64();
    let vid = match committed {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            r.error = Some(format!("local commit: {e:#}"));
            return r;
        }
        Err(e) => {
            r.error = Some(format!("local commit: {e}"));
            return r;
        }
    };
    p.local_tip = Some(vid);
    p.generation += 1;
    let image = Sim::user_image(&p.name);
    let t1 = Instant::now();
    let client = match sim.hub.point(&p.credential) {
        Ok(c) => c,
        Err(e) => {
            r.error = Some(format!("client: {e:#}"));
            return r;
        }
    };
    let fail = |r: &mut CheckinResult, what: String| {
        r.latency_s = t1.elapsed().as_secs_f64();
        r.error = Some(what);
    };
    if sim.report {
        let t = Instant::now();
        let rep = report_of(&sim, p, vid, true);
        if let Err(e) = client.report_desktop(&p.name, &rep).await {
            fail(&mut r, format!("report: {e}"));
            return r;
        }
        r.report_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    let pushed = strata_sync::push(
        &sim.local,
        &client,
        &image,
        "main",
        &vid,
        &PushOptions {
            expected: Expect::Value(Some(p.hub_tip)),
            ..PushOptions::default()
        },
    )
    .await;
    r.push_s = t.elapsed().as_secs_f64();
    match pushed {
        Ok(st) => {
            p.hub_tip = vid;
            p.last_push = Some(crate::now());
            r.objects = st.objects();
            r.logical_bytes = st.logical_bytes;
            r.deltas = st.deltas;
        }
        Err(e) => {
            fail(&mut r, format!("push: {e}"));
            return r;
        }
    }
    if sim.report {
        let t = Instant::now();
        let rep = report_of(&sim, p, vid, false);
        if let Err(e) = client.report_desktop(&p.name, &rep).await {
            fail(&mut r, format!("report: {e}"));
            return r;
        }
        r.report_s += t.elapsed().as_secs_f64();
    }
    let t = Instant::now();
    match client.desktops().await {
        Ok(ds) => match ds.iter().find(|d| d.name == p.name) {
            Some(d) => r.channel_moved = d.os_version.as_deref() != Some(&sim.gold_version),
            None => r.error = Some(format!("the hub lists no desktop {} for it", p.name)),
        },
        Err(e) => r.error = Some(format!("desktops: {e}")),
    }
    r.query_s = t.elapsed().as_secs_f64();
    r.latency_s = t1.elapsed().as_secs_f64();
    if r.error.is_none() {
        p.last_sync = Some(crate::now());
    }
    let wire = client.wire();
    r.wire_sent = wire.sent;
    r.wire_received = wire.received;
    r
}

/// What the agent reports of a desktop (`Point::desktop_report`): before the push
/// the new version is local only (its changed blocks pending), after it nothing is.
fn report_of(sim: &Sim, p: &PointSim, head: VersionId, before_push: bool) -> DesktopPointReport {
    let unpushed = if before_push {
        (sim.writes.changed * sim.writes.block_size) as u64
    } else {
        0
    };
    DesktopPointReport {
        time: crate::now(),
        os_version: Some(sim.gold_version.clone()),
        os_reset: 0,
        user_version: Some(head.to_hex()),
        last_commit: Some(crate::now()),
        user_pushed: Some(p.hub_tip.to_hex()),
        last_push: p.last_push,
        last_sync: p.last_sync,
        unpushed_bytes: unpushed,
        uncommitted_bytes: 0,
        pending_bytes: unpushed,
        streaming: false,
    }
}

/// Wait until the hub answers (it may still be starting).
pub async fn wait_for_hub(hub: &HubAccess, within: Duration) -> Result<()> {
    let admin = hub.admin()?;
    let t0 = Instant::now();
    loop {
        match admin.channels().await {
            Ok(_) => return Ok(()),
            Err(_) if t0.elapsed() < within => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => bail!("the hub at {} does not answer: {e}", hub.url),
        }
    }
}
