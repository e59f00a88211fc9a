//! `roller plan`: the plan a rollout would run, built offline from the inventory alone, so
//! that what is printed is the very object the executor would be given.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::balancer::Nginx;
use crate::error::{Error, Result};
use crate::inventory::{Inventory, Strategy};
use crate::journal::RunKind;
use crate::plan::{Artifact, BatchSize, Plan, PlanInput, validate_release};
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
    /// `--rollback-to`: the plan of `roller rollback --to` this release: no jar, no stage.
    pub rollback_to: Option<String>,
    /// Canary: wait for `roller promote` or `roller abort` after the last hold.
    pub pause: bool,
}

/// A plan with the load-balancer driver that renders its pool changes.
pub struct Planned {
    pub plan: Plan,
    pub balancer: Nginx,
}

pub fn plan(request: PlanRequest) -> Result<Planned> {
    let mut inventory = request.inventory;
    inventory.strategy = request.strategy.unwrap_or(inventory.strategy);
    let selected = request.selection.resolve(&inventory)?;
    let balancer = Nginx::new(&inventory.balancer, &inventory.app, &inventory.hosts);
    let artifact = request
        .artifact
        .as_deref()
        .map(Artifact::load)
        .transpose()?;
    let release = match &request.rollback_to {
        Some(_) if inventory.strategy == Strategy::BlueGreen => {
            return Err(Error::Usage {
                flag: "--rollback-to".into(),
                message: "under blue-green a rollback is a switch-back: traffic back to the other slot, no plan of batches".into(),
            });
        }
        Some(to) => {
            validate_release(to).map_err(|_| Error::Usage {
                flag: "--rollback-to".into(),
                message: format!(
                    "{to:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
                ),
            })?;
            to.clone()
        }
        None => release_for(request.release.as_deref(), artifact.as_ref())?,
    };
    let kind = match request.rollback_to {
        Some(_) => RunKind::Rollback,
        None => RunKind::Rollout,
    };
    let plan = Plan::build(PlanInput {
        inventory: &inventory,
        balancer: &balancer,
        release,
        artifact,
        batch: request.batch,
        observed: None,
        unfinished: &BTreeSet::new(),
        targets: None,
        selected: selected.as_ref(),
        strategy: inventory.strategy,
        live_slot: None,
        pause: request.pause,
        adopt: false,
    })?;
    Ok(Planned {
        plan: Plan { kind, ..plan },
        balancer,
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
