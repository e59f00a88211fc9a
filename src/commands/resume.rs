//! `roller resume` and `roller recover`: pick up a rollout that did not finish, from the state
//! on the lock host or a local journal, and either finish it or put every host back.
//!
//! Nothing in the recorded state is taken as a local path or a command: it is checked before
//! use, and the jar comes from `--artifact` or from the hosts, which must already hold it with
//! the recorded checksum.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use super::deploy::{self, Deploy, Kind};
use super::{Control, Display, Finished, Hints, read_state, trusted};
use crate::discovery;
use crate::error::{Error, HostFailure, Result, StateError, Unfinished};
use crate::executor::Sessions;
use crate::inventory::Inventory;
use crate::journal::{Journal, RolloutState, RunKind};
use crate::plan::Artifact;
use crate::session;

/// What `roller resume` or `roller recover` is asked.
pub struct ResumeRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    pub control: Control,
    /// Read the rollout's state from this local journal instead of the lock host.
    pub journal: Option<PathBuf>,
    /// The jar, when it is no longer where the interrupted rollout read it.
    pub artifact: Option<PathBuf>,
    /// Put every host back on its release from before, instead of finishing.
    pub recover: bool,
}

pub async fn run(request: ResumeRequest, display: Display<'_>) -> Result<Finished> {
    let ResumeRequest {
        mut inventory,
        inventory_path,
        control,
        journal,
        artifact,
        recover,
    } = request;
    let verb = if recover { "recover" } else { "resume" };
    let state = match &journal {
        Some(path) => {
            let state = Journal::last_state(path)
                .map_err(|source| {
                    Error::from(StateError::JournalRead {
                        path: path.clone(),
                        source,
                    })
                })?
                .ok_or_else(|| {
                    Error::from(Unfinished::EmptyJournal {
                        journal: path.clone(),
                    })
                })?;
            trusted(state, &inventory, &path.display().to_string())?
        }
        None => read_remote_state(&inventory).await?.ok_or_else(|| {
            Error::from(Unfinished::NoneRecorded {
                app: inventory.app.name.clone(),
                lock_host: inventory.balancer.lock_host.clone(),
                verb,
            })
        })?,
    };
    if !state.status.unfinished() {
        return Err(Error::from(Unfinished::AlreadyEnded {
            id: state.id,
            release: state.release,
            status: state.status,
            verb,
        }));
    }
    let artifact = if recover {
        None
    } else {
        resumed_artifact(&state, artifact)?
    };
    recorded_hosts(&mut inventory, &state)?;
    inventory.strategy = state.strategy;
    let selected = (!state.selected.is_empty()).then(|| state.selected.iter().cloned().collect());
    let deploy = Deploy {
        inventory,
        hints: Hints::for_inventory(&inventory_path),
        release: state.release.clone(),
        artifact,
        batch: state.batch,
        pause: false,
        on_failure: state.on_failure,
        max_failed_hosts: state.max_failed_hosts,
        control,
        selected,
        kind: if recover {
            Kind::Recover(state)
        } else {
            Kind::Resume(state)
        },
    };
    deploy::run(deploy, display).await
}

/// The jar a resumed rollout goes on with. Never a path from the recorded state: whoever can
/// write that file could make us upload any local file. Without `--artifact`, every host must
/// already hold the recorded jar, checked under the lock by [`verify_staged_jar`].
fn resumed_artifact(state: &RolloutState, path: Option<PathBuf>) -> Result<Option<Artifact>> {
    match path {
        Some(path) => {
            let artifact = Artifact::load(&path)?;
            if state
                .artifact_sha256
                .as_ref()
                .is_some_and(|sha| sha != &artifact.sha256)
            {
                return Err(Error::Artifact {
                    path,
                    message: format!(
                        "is not the jar of release {} (its sha256 differs from the one recorded)",
                        state.release
                    ),
                });
            }
            Ok(Some(artifact))
        }
        // A rollback goes back to a release already on the hosts: its switch checks the jar.
        None if state.kind == RunKind::Rollback => Ok(None),
        None if state.artifact_sha256.is_none() => Err(Error::Usage {
            flag: "--artifact".into(),
            message: format!(
                "rollout {} records no checksum for release {}: give its jar with --artifact",
                state.id, state.release
            ),
        }),
        None => Ok(None),
    }
}

/// A discovering inventory's hosts as `state` recorded them: a resume or recover acts on the
/// fleet the rollout found, even if the group scaled since.
fn recorded_hosts(inventory: &mut Inventory, state: &RolloutState) -> Result<()> {
    let Some(discovery) = &inventory.discovery else {
        return Ok(());
    };
    if state.found.is_empty() {
        return Err(Error::from(StateError::NoRecordedHosts {
            id: state.id.clone(),
        }));
    }
    inventory.hosts = discovery::into_hosts(&state.found, discovery.user());
    inventory.apply_host_names()
}

async fn read_remote_state(inv: &Inventory) -> Result<Option<RolloutState>> {
    let lb = session::connect_lock_host(inv).await?;
    let state = read_state(lb.as_ref(), inv).await;
    lb.close().await;
    state
}

/// Without a jar given, a resumed rollout relies on the one staged on every host it acts on (the
/// rollout's selection, if it had one): each must hold it with the recorded checksum, or
/// nothing starts.
pub(super) async fn verify_staged_jar(
    inv: &Inventory,
    sessions: &Sessions,
    selected: Option<&BTreeSet<String>>,
    release: &str,
    sha256: &str,
) -> Result<()> {
    let command = crate::remote::artifact_present(&inv.app, release, sha256);
    let acted_on = inv
        .hosts
        .iter()
        .filter(|h| selected.is_none_or(|s| s.contains(&h.name)));
    let checks = futures::future::join_all(acted_on.map(|h| {
        let command = command.clone();
        async move {
            let out = sessions[&h.name]
                .exec(&command, None, Duration::from_secs(60))
                .await;
            (h.name.clone(), out)
        }
    }))
    .await;
    let failures: Vec<HostFailure> = checks
        .into_iter()
        .filter_map(|(host, out)| {
            let message = match out {
                Ok(out) if out.success() && out.stdout_text() == "present" => return None,
                Ok(out) if out.success() => format!(
                    "{}/releases/{release}/{} is missing or not the recorded jar: give it with --artifact",
                    inv.app.dir, inv.app.jar_name
                ),
                Ok(out) => out.stderr_text(),
                Err(e) => e.to_string(),
            };
            Some(HostFailure {
                host,
                step: "staged jar".into(),
                message,
            })
        })
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Preflight { failures })
    }
}
