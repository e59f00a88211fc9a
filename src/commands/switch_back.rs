//! `roller switch-back`: blue-green only, traffic back to the other slot with one reload and no
//! restart, refused in words when that slot does not answer everywhere.

use std::path::PathBuf;
use std::time::Duration;

use super::deploy::{self, Deploy, Kind};
use super::{Control, Display, Finished, Hints};
use crate::error::{Error, Result};
use crate::executor::{FailurePolicy, Sessions};
use crate::health::{HealthCheck, HealthSpec, HttpOverSsh};
use crate::inventory::{Inventory, Slot, Strategy};
use crate::plan::BatchSize;

/// What `roller switch-back` is asked.
pub struct SwitchBackRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    pub control: Control,
}

pub async fn run(request: SwitchBackRequest, display: Display<'_>) -> Result<Finished> {
    let mut inventory = request.inventory;
    if inventory.blue_green.is_none() {
        return Err(Error::Usage {
            flag: "switch-back".into(),
            message: format!(
                "needs a [blue_green] section in {}",
                request.inventory_path.display()
            ),
        });
    }
    inventory.strategy = Strategy::BlueGreen;
    let deploy = Deploy {
        inventory,
        hints: Hints::for_inventory(&request.inventory_path),
        release: "switch-back".into(),
        artifact: None,
        batch: BatchSize::Hosts(1),
        pause: false,
        on_failure: FailurePolicy::RollbackBatch,
        max_failed_hosts: 0,
        control: request.control,
        selected: None,
        kind: Kind::SwitchBack,
    };
    deploy::run(deploy, display).await
}

/// A switch-back only moves traffic, so the slot it moves traffic to must answer on every host
/// already. One probe per host, all at once; when any is silent nothing changes, and the
/// operator is told so in words rather than as a failed rollout.
pub(super) async fn refuse_silent_slot(
    inv: &Inventory,
    sessions: &Sessions,
    live: Slot,
) -> Result<()> {
    let Some(bg) = inv.blue_green.as_ref() else {
        return Ok(());
    };
    let back = live.other();
    let probes = inv.hosts.iter().map(|h| async move {
        let spec = HealthSpec {
            timeout: inv.health.interval.max(Duration::from_secs(2)),
            successes: 1,
            ..HealthSpec::wait(&h.address, bg.port(back), inv)
        };
        let answered = match sessions.get(&h.name) {
            Some(session) => HttpOverSsh
                .probe(session.as_ref(), &spec, spec.timeout)
                .await
                .is_ok(),
            None => false,
        };
        (h.name.clone(), answered)
    });
    let silent: Vec<String> = futures::future::join_all(probes)
        .await
        .into_iter()
        .filter(|(_, answered)| !answered)
        .map(|(host, _)| host)
        .collect();
    if silent.is_empty() {
        return Ok(());
    }
    Err(Error::SwitchBackRefused {
        slot: back,
        live,
        hosts: silent,
    })
}
