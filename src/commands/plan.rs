//! `roller plan`: the plan a rollout would run, built offline from the inventory alone, so
//! that what is printed is the very object the executor would be given.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::balancer::Nginx;
use crate::error::{Error, Result};
use crate::inventory::{Inventory, Strategy};
use crate::plan::{Artifact, BatchSize, Plan, PlanInput};
use crate::selection::Selection;

/// What `roller plan` is asked.
pub struct PlanRequest {
    pub inventory: Inventory,
    pub artifact: Option<PathBuf>,
    pub release: Option<String>,
    pub batch: BatchSize,
    /// Overrides the inventory's `strategy`.
    pub strategy: Option<Strategy>,
    /// `--hosts` / `--tag`.
    pub selection: Selection,
}

pub fn plan(request: PlanRequest) -> Result<Plan> {
    let mut inventory = request.inventory;
    inventory.strategy = request.strategy.unwrap_or(inventory.strategy);
    let selected = request.selection.resolve(&inventory)?;
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    let artifact = request
        .artifact
        .as_deref()
        .map(Artifact::load)
        .transpose()?;
    Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release: release_for(request.release.as_deref(), artifact.as_ref())?,
        artifact,
        batch: request.batch,
        observed: None,
        unfinished: &BTreeSet::new(),
        targets: None,
        selected: selected.as_ref(),
        strategy: inventory.strategy,
        live_slot: None,
        pause: false,
        adopt: false,
    })
}

/// The release asked for, else the jar's default name; one of the two must be given.
pub fn release_for(release: Option<&str>, artifact: Option<&Artifact>) -> Result<String> {
    match (release, artifact) {
        (Some(r), _) => Ok(r.to_string()),
        (None, Some(a)) => Ok(a.default_release()),
        (None, None) => Err(Error::Usage {
            flag: "--release".into(),
            message: "give --artifact, --release, or both".into(),
        }),
    }
}
