//! `roller rollout`: a new release across the fleet, checked for what can be refused before
//! any host is contacted (a strategy without its section, no jar).

use std::path::PathBuf;

use super::deploy::{self, Deploy, Kind};
use super::plan::release_for;
use super::{Control, Display, Finished, Hints};
use crate::error::{Error, Result};
use crate::executor::FailurePolicy;
use crate::inventory::{Inventory, Strategy};
use crate::plan::{Artifact, BatchSize};
use crate::selection::Selection;

/// What `roller rollout` is asked.
pub struct RolloutRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    pub artifact: Option<PathBuf>,
    pub release: Option<String>,
    pub batch: BatchSize,
    /// Overrides the inventory's `strategy`.
    pub strategy: Option<Strategy>,
    pub on_failure: FailurePolicy,
    pub max_failed_hosts: usize,
    /// Canary: after the last hold, wait for `roller promote` or `roller abort`.
    pub pause: bool,
    pub control: Control,
    /// `--hosts` / `--tag`.
    pub selection: Selection,
}

pub async fn run(request: RolloutRequest, display: Display<'_>) -> Result<Finished> {
    let mut inventory = request.inventory;
    inventory.strategy = request.strategy.unwrap_or(inventory.strategy);
    if inventory.strategy == Strategy::BlueGreen && inventory.blue_green.is_none() {
        return Err(Error::Usage {
            flag: "--strategy".into(),
            message: format!(
                "blue-green needs a [blue_green] section in {}",
                request.inventory_path.display()
            ),
        });
    }
    let selected = request.selection.resolve(&inventory)?;
    let Some(path) = &request.artifact else {
        return Err(Error::Usage {
            flag: "--artifact".into(),
            message: "a rollout needs the jar to upload".into(),
        });
    };
    let artifact = Artifact::load(path)?;
    let release = release_for(request.release.as_deref(), Some(&artifact))?;
    let deploy = Deploy {
        inventory,
        hints: Hints::for_inventory(&request.inventory_path),
        release,
        artifact: Some(artifact),
        batch: request.batch,
        pause: request.pause,
        on_failure: request.on_failure,
        max_failed_hosts: request.max_failed_hosts,
        control: request.control,
        selected,
        kind: Kind::Rollout,
    };
    deploy::run(deploy, display).await
}
