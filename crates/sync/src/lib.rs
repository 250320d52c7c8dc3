//! # strata-sync: moving versions between a point's store and the hub
//!
//! The hub (`strata-hub`) keeps images in a data centre; points keep local stores
//! and exchange versions with it. This crate is the transfer layer both ends share:
//!
//! * [`frame`]: the object stream, the binary format in which batches of objects
//!   travel in one HTTP body (one zstd stream per batch; parsed incrementally with
//!   hard limits; fuzzed via [`frame::fuzz_frames`]);
//! * [`delta`]: an object as a zstd delta against one the receiver holds;
//! * [`api`]: the JSON and binary types of the hub API (`docs/hub-api.yaml`);
//! * [`client::HubClient`]: one async method per endpoint, with verified downloads,
//!   a bandwidth cap ([`rate`]), timeouts and parallel requests;
//! * [`transfer`]: [`pull`] and [`push`], which move only what the other side
//!   lacks, resume after a cut, and count the bytes on the wire;
//! * [`bundle`]: a version (or what changed since another) in one file, carried
//!   where no network reaches, verified on import like a pull.
//!
//! Every object is verified by hash (data in the plain domain, tree nodes and
//! version records in their derived-key domains) before it is stored, on both ends.
//!
//! ## How the CLI and the point agent call this
//!
//! ```no_run
//! # async fn f(store: &strata_store::Store) -> Result<(), strata_sync::SyncError> {
//! use strata_sync::{ClientConfig, HubClient, PullOptions, PushOptions};
//! // `strata point enroll URL TOKEN`: no credential yet.
//! let anon = HubClient::new(&ClientConfig::new("https://hub:7443"))?;
//! let enrolled = anon.enroll("TOKEN").await?; // keep enrolled.credential (0600)
//! let mut cfg = ClientConfig::new("https://hub:7443").credential(&enrolled.credential);
//! cfg.max_rate = Some(10 << 20); // --max-rate 10M
//! let hub = HubClient::new(&cfg)?;
//! // `strata point pull gold@main`: fetches what the store lacks, moves local gold:main.
//! let st = strata_sync::pull(store, &hub, "gold", "main", &PullOptions::default()).await?;
//! println!("{} objects, {} bytes on the wire", st.objects(), st.wire_received);
//! // Uploading a committed session version to the point's own image:
//! let v = store.resolve("laptop-1", Some("main"))?;
//! strata_sync::push(store, &hub, "laptop-1", "main", &v, &PushOptions::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Errors sort by what to do: [`SyncError::is_transient`] (retry later: the link
//! failed; what arrived is kept), [`SyncError::Conflict`] (a branch moved; nothing
//! changed), [`SyncError::Unauthorized`] / [`SyncError::Forbidden`] (401/403).
//!
//! A point that reads a version lazily must not add tree nodes to its store before
//! their subtrees are complete ([`strata_store::WriteSession::add_received`] refuses
//! that), because "node present ⇒ subtree present" is what lets transfers skip
//! shared subtrees; keep lazily fetched nodes in a cache of their own.

pub mod api;
pub mod bundle;
pub mod client;
pub mod delta;
pub mod error;
pub mod frame;
pub mod pages;
pub mod rate;
pub mod transfer;

pub use api::Want;
pub use client::{
    BaseSource, ClientConfig, Download, HubClient, NoBases, Object, UploadObject, WireStats,
};
pub use error::{Result, SyncError};
pub use frame::fuzz_frames;
pub use transfer::{
    pull, push, Expect, PullOptions, PushOptions, Seed, TransferOptions, TransferStats,
};
