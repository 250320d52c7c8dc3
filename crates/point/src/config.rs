//! `point.json` and `point.credential`: how this point reaches its hub, made once by
//! [`enroll`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_store::Store;
use strata_sync::{ClientConfig, HubClient};

use crate::{io_err, write_atomic, PointError, Result};

pub const CONFIG_FILE: &str = "point.json";
pub const CREDENTIAL_FILE: &str = "point.credential";

/// The point's configuration (`STORE/point.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PointConfig {
    pub format: u32,
    /// The hub's URL, e.g. `https://hub.example:7443`.
    pub hub: String,
    /// This point's name on the hub (chosen by the operator at `hub enroll`).
    pub point: String,
    /// PEM file with the certificate(s) to trust for an `https` hub.
    pub ca_file: Option<PathBuf>,
    /// Seconds between sync rounds of the agent.
    pub sync_interval_secs: u64,
    /// Bandwidth cap to the hub in bytes per second (all streams together).
    pub max_rate: Option<u64>,
}

impl PointConfig {
    pub fn load(store_root: &Path) -> Result<PointConfig> {
        let path = store_root.join(CONFIG_FILE);
        let text = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                PointError::Invalid(format!(
                    "{} is not a point (no {CONFIG_FILE}): run `strata point enroll HUB_URL TOKEN` first",
                    store_root.display()
                ))
            } else {
                io_err(&path)(e)
            }
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| PointError::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn save(&self, store_root: &Path) -> Result<()> {
        let mut b = serde_json::to_vec_pretty(self).expect("config serializes");
        b.push(b'\n');
        write_atomic(&store_root.join(CONFIG_FILE), &b, 0o644)
    }

    pub fn sync_interval(&self) -> Duration {
        Duration::from_secs(self.sync_interval_secs.max(1))
    }

    /// A client configured for this point (credential, CA, rate cap).
    pub fn client(&self, store_root: &Path) -> Result<HubClient> {
        let path = store_root.join(CREDENTIAL_FILE);
        let cred = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let mut cfg = client_config(&self.hub, self.ca_file.as_deref())?.credential(cred.trim());
        cfg.max_rate = self.max_rate;
        Ok(HubClient::new(&cfg)?)
    }
}

/// A client configuration for `url`, trusting the certificates in `ca_file`.
pub fn client_config(url: &str, ca_file: Option<&Path>) -> Result<ClientConfig> {
    let mut cfg = ClientConfig::new(url);
    if let Some(ca) = ca_file {
        cfg.ca_pem = Some(std::fs::read(ca).map_err(io_err(ca))?);
    }
    Ok(cfg)
}

/// Options of [`enroll`].
#[derive(Clone, Debug, Default)]
pub struct EnrollOptions {
    pub ca_file: Option<PathBuf>,
    pub max_rate: Option<u64>,
    pub sync_interval: Option<Duration>,
}

/// `strata point enroll`: make `store_root` a point of the hub at `url` by
/// exchanging the one-time `token` for a credential. The store is created if it
/// does not exist. Refuses a store that is already a point.
pub async fn enroll(
    store_root: &Path,
    url: &str,
    token: &str,
    opts: &EnrollOptions,
) -> Result<PointConfig> {
    if store_root.join(CONFIG_FILE).exists() {
        return Err(PointError::Invalid(format!(
            "{} is already a point ({CONFIG_FILE} exists)",
            store_root.display()
        )));
    }
    let ca_file = match &opts.ca_file {
        // Kept as an absolute path: the agent may run from another directory.
        Some(p) => Some(std::fs::canonicalize(p).map_err(io_err(p))?),
        None => None,
    };
    let anon = HubClient::new(&client_config(url, ca_file.as_deref())?)?;
    // Ask the hub before touching the disk: a bad token leaves nothing behind.
    let enrolled = anon.enroll(token).await?;
    if !store_root.join("strata.json").exists() {
        Store::init(store_root)?;
    }
    let cred = store_root.join(CREDENTIAL_FILE);
    write_atomic(
        &cred,
        format!("{}\n", enrolled.credential).as_bytes(),
        0o600,
    )?;
    let cfg = PointConfig {
        format: 1,
        hub: url.trim_end_matches('/').to_string(),
        point: enrolled.point,
        ca_file,
        sync_interval_secs: opts
            .sync_interval
            .unwrap_or(Duration::from_secs(300))
            .as_secs()
            .max(1),
        max_rate: opts.max_rate,
    };
    cfg.save(store_root)?;
    Ok(cfg)
}
