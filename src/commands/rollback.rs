//! `roller rollback`: a rolling rollout back to a release the hosts already hold, the one
//! before the live one or a named one, with no upload. It is a rollout in every other way
//! (lock, pre-flight, drains, health checks, journal, failure policies), built by the same
//! planner; under blue-green it is `switch-back`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use super::deploy::{self, Deploy, Kind};
use super::switch_back::{self, SwitchBackRequest};
use super::{Control, Display, Finished, Hints};
use crate::error::{Error, HostFailure, Result};
use crate::executor::{FailurePolicy, FleetAtPreflight, Sessions, release_name};
use crate::inventory::{Inventory, Strategy};
use crate::plan::{BatchSize, is_release, validate_release};
use crate::selection::Selection;

/// What `roller rollback` is asked.
pub struct RollbackRequest {
    pub inventory: Inventory,
    pub inventory_path: PathBuf,
    /// `--to`: this release instead of the one before the live one.
    pub to: Option<String>,
    pub batch: BatchSize,
    pub on_failure: FailurePolicy,
    pub max_failed_hosts: usize,
    pub control: Control,
    /// `--hosts` / `--tag`.
    pub selection: Selection,
}

/// What the lock records as the release of a rollback whose target is read from the hosts
/// only once it holds the lock.
const UNRESOLVED: &str = "rollback";

pub async fn run(request: RollbackRequest, display: Display<'_>) -> Result<Finished> {
    let inventory = request.inventory;
    if inventory.strategy == Strategy::BlueGreen {
        // The old slots still run the release before: sending traffic back to them is the
        // rollback, with no restart.
        if request.to.is_some() {
            return Err(Error::Usage {
                flag: "--to".into(),
                message: "under blue-green a rollback is a switch-back to the other slot; to go to another release, roll it out".into(),
            });
        }
        request.selection.refuse(
            "rollback",
            "under blue-green it moves every host's traffic at once",
        )?;
        return switch_back::run(
            SwitchBackRequest {
                inventory,
                inventory_path: request.inventory_path,
                control: request.control,
            },
            display,
        )
        .await;
    }
    if let Some(to) = &request.to {
        validate_release(to).map_err(|_| Error::Usage {
            flag: "--to".into(),
            message: format!(
                "{to:?} must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        })?;
    }
    let selected = request.selection.resolve(&inventory)?;
    let deploy = Deploy {
        inventory,
        hints: Hints::for_inventory(&request.inventory_path),
        release: request.to.clone().unwrap_or_else(|| UNRESOLVED.into()),
        artifact: None,
        batch: request.batch,
        pause: false,
        on_failure: request.on_failure,
        max_failed_hosts: request.max_failed_hosts,
        control: request.control,
        selected,
        kind: Kind::Rollback { to: request.to },
    };
    deploy::run(deploy, display).await
}

/// What one host offers a rollback, as read back from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// The release `current` pointed at before roller last switched it.
    pub previous: Option<String>,
    /// Releases whose jar is on the host.
    pub releases: BTreeSet<String>,
}

/// Under the lock, after pre-flight: reads what each selected host holds and decides the one
/// release they all go back to. Refused, naming the hosts, when they disagree or one lacks it.
pub(super) async fn target(
    inv: &Inventory,
    sessions: &Sessions,
    observed: &FleetAtPreflight,
    to: Option<&str>,
    selected: Option<&BTreeSet<String>>,
) -> Result<String> {
    let command = crate::remote::releases_held(&inv.app);
    let hosts: Vec<&str> = inv
        .hosts
        .iter()
        .map(|h| h.name.as_str())
        .filter(|h| selected.is_none_or(|s| s.contains(*h)))
        .collect();
    let reads = futures::future::join_all(hosts.iter().map(|host| {
        let command = command.clone();
        async move {
            let out = sessions[*host]
                .exec(&command, None, Duration::from_secs(60))
                .await;
            (host.to_string(), out)
        }
    }))
    .await;
    let mut failures = Vec::new();
    let mut held = BTreeMap::new();
    for (host, out) in reads {
        match out {
            Ok(out) if out.success() => {
                held.insert(host, parse_held(&out.stdout_text()));
            }
            Ok(out) => failures.push(failure(&host, out.stderr_text())),
            Err(e) => failures.push(failure(&host, e.to_string())),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Preflight { failures });
    }
    let live: BTreeMap<String, Option<String>> = observed
        .hosts
        .iter()
        .map(|(h, o)| (h.clone(), o.release.clone()))
        .collect();
    decide(inv, to, &held, &live).map_err(|failures| Error::Preflight { failures })
}

fn failure(host: &str, message: String) -> HostFailure {
    HostFailure {
        host: host.to_string(),
        step: "rollback".into(),
        message,
    }
}

/// Reads [`crate::remote::releases_held`]'s output. A name that breaks the release rules is
/// dropped from `releases`; a `previous` that does is kept as written, so that [`decide`]
/// names it in its refusal.
pub fn parse_held(stdout: &str) -> Held {
    let mut held = Held::default();
    for line in stdout.lines() {
        match line.split_once('=') {
            Some(("previous", p)) if !p.trim().is_empty() => held.previous = Some(p.to_string()),
            Some(("holds", r)) if is_release(r) => {
                held.releases.insert(r.to_string());
            }
            _ => {}
        }
    }
    held
}

/// The release every host in `held` goes back to: `to`, or the previous release they agree
/// on. A host already live on it needs no previous release of its own. Every host that must
/// switch must hold it. `live` is each host's live release at pre-flight.
pub fn decide(
    inv: &Inventory,
    to: Option<&str>,
    held: &BTreeMap<String, Held>,
    live: &BTreeMap<String, Option<String>>,
) -> std::result::Result<String, Vec<HostFailure>> {
    let live_on = |host: &str, release: &str| {
        live.get(host)
            .is_some_and(|l| l.as_deref() == Some(release))
    };
    let target = match to {
        Some(to) => to.to_string(),
        None => agreed_previous(inv, held, &live_on)?,
    };
    let missing: Vec<HostFailure> = held
        .iter()
        .filter(|(host, h)| !live_on(host, &target) && !h.releases.contains(&target))
        .map(|(host, _)| {
            failure(
                host,
                format!(
                    "release {target} is not on this host ({}/releases/{target}/{} is missing): nothing was changed",
                    inv.app.dir, inv.app.jar_name
                ),
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(target)
    } else {
        Err(missing)
    }
}

/// The previous release as each host recorded it, if they agree; the hosts already live on
/// it are left out of the vote.
fn agreed_previous(
    inv: &Inventory,
    held: &BTreeMap<String, Held>,
    live_on: &dyn Fn(&str, &str) -> bool,
) -> std::result::Result<String, Vec<HostFailure>> {
    let mut failures = Vec::new();
    let mut previous: BTreeMap<&str, String> = BTreeMap::new();
    for (host, h) in held {
        match &h.previous {
            // A switch that was rolled back leaves the release it replaced recorded as the
            // previous one while that release is live again: it says nothing about before.
            Some(raw) if live_on(host, &release_name(raw)) => {}
            Some(raw) if is_release(&release_name(raw)) => {
                previous.insert(host, release_name(raw));
            }
            Some(raw) => failures.push(failure(
                host,
                format!(
                    "{}/.roller/previous holds {:?}, which is not a release by the release rules; name the release with --to",
                    inv.app.dir,
                    raw.chars().take(120).collect::<String>()
                ),
            )),
            None => {}
        }
    }
    if !failures.is_empty() {
        return Err(failures);
    }
    let candidates: BTreeSet<&String> = previous.values().collect();
    let agreed: Vec<&String> = candidates
        .into_iter()
        .filter(|c| {
            held.keys()
                .filter(|host| !live_on(host, c))
                .all(|host| previous.get(host.as_str()) == Some(*c))
        })
        .collect();
    if let [release] = agreed[..] {
        return Ok(release.clone());
    }
    let said = |host: &str| match previous.get(host) {
        Some(p) => format!("previous release {p}"),
        None => "no previous release recorded apart from the live one".into(),
    };
    Err(held
        .keys()
        .map(|host| {
            failure(
                host,
                format!(
                    "the hosts do not agree on the release before the live one ({}); name one with --to",
                    said(host)
                ),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let text = crate::inventory::MINIMAL.to_string()
            + r#"
            [[hosts]]
            name = "web-1"
            address = "10.0.0.1"
            [[hosts]]
            name = "web-2"
            address = "10.0.0.2"
        "#;
        Inventory::parse(&text).expect("a valid inventory")
    }

    /// Each host as `(name, live, what releases_held printed)`.
    fn decided(
        to: Option<&str>,
        hosts: &[(&str, &str, &str)],
    ) -> std::result::Result<String, Vec<(String, String)>> {
        let held = hosts
            .iter()
            .map(|(h, _, out)| (h.to_string(), parse_held(out)))
            .collect();
        let live = hosts
            .iter()
            .map(|(h, l, _)| (h.to_string(), Some(l.to_string())))
            .collect();
        decide(&inventory(), to, &held, &live)
            .map_err(|f| f.into_iter().map(|f| (f.host, f.message)).collect())
    }

    const HOLDS_V1_V2: &str = "previous=releases/v1\nholds=v1\nholds=v2\n";

    #[test]
    fn the_previous_release_the_hosts_agree_on() {
        let both = [("web-1", "v2", HOLDS_V1_V2), ("web-2", "v2", HOLDS_V1_V2)];
        assert_eq!(decided(None, &both), Ok("v1".into()));
    }

    #[test]
    fn a_host_already_live_on_it_needs_no_previous_of_its_own() {
        let hosts = [
            ("web-1", "v2", HOLDS_V1_V2),
            ("web-2", "v1", "previous=releases/v0\nholds=v1\n"),
        ];
        assert_eq!(decided(None, &hosts), Ok("v1".into()));
    }

    #[test]
    fn hosts_that_disagree_are_refused_naming_each() {
        let hosts = [
            ("web-1", "v3", "previous=releases/v2\nholds=v2\n"),
            ("web-2", "v1", "holds=v1\nholds=v2\n"),
        ];
        let refused = decided(None, &hosts).unwrap_err();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].1.contains("previous release v2"), "{refused:?}");
        assert!(
            refused[1].1.contains("no previous release recorded"),
            "{refused:?}"
        );
    }

    /// After a failed rollout of v3 rolled web-1 back to v2, web-1's record names v2, its live
    /// release again: it cannot vote, so the rollback is refused rather than a no-op to v2.
    #[test]
    fn a_previous_release_that_is_live_again_is_no_answer() {
        let hosts = [
            ("web-1", "v2", "previous=releases/v2\nholds=v1\nholds=v2\n"),
            ("web-2", "v2", HOLDS_V1_V2),
        ];
        let refused = decided(None, &hosts).unwrap_err();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(
            refused[0].1.contains("apart from the live one"),
            "{refused:?}"
        );
        assert_eq!(decided(Some("v1"), &hosts), Ok("v1".into()));
    }

    #[test]
    fn a_release_missing_on_a_host_is_refused_naming_it() {
        let hosts = [
            ("web-1", "v2", HOLDS_V1_V2),
            ("web-2", "v2", "previous=releases/v1\nholds=v2\n"),
        ];
        let refused = decided(None, &hosts).unwrap_err();
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "web-2");
        assert!(
            refused[0].1.contains("/srv/shop/releases/v1/"),
            "{refused:?}"
        );
        let refused = decided(Some("v0"), &hosts).unwrap_err();
        assert_eq!(refused.len(), 2);
    }

    #[test]
    fn what_a_host_prints_is_checked_by_the_release_rules() {
        let held = parse_held("previous=releases/$(reboot)\nholds=v1\nholds=../etc\nholds=.x\n");
        assert_eq!(held.releases, BTreeSet::from(["v1".to_string()]));
        let hosts = [
            ("web-1", "v2", "previous=releases/$(reboot)\nholds=v1\n"),
            ("web-2", "v2", HOLDS_V1_V2),
        ];
        let refused = decided(None, &hosts).unwrap_err();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.contains("not a release"), "{refused:?}");
    }

    /// The command under sh on a real directory: the recorded previous release, and only the
    /// release directories that hold the jar.
    #[test]
    fn releases_held_reads_previous_and_the_releases_with_a_jar() {
        let dir = std::env::temp_dir().join(format!("roller-held-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for r in ["v1", "v2", "empty"] {
            std::fs::create_dir_all(dir.join("releases").join(r)).unwrap();
        }
        std::fs::write(dir.join("releases/v1/app.jar"), b"jar").unwrap();
        std::fs::write(dir.join("releases/v2/app.jar"), b"jar").unwrap();
        std::fs::create_dir_all(dir.join(".roller")).unwrap();
        std::fs::write(dir.join(".roller/previous"), "releases/v1\n").unwrap();
        let mut inv = inventory();
        inv.app.dir = dir.to_string_lossy().into_owned();
        inv.app.jar_name = "app.jar".into();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(crate::remote::releases_held(&inv.app))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let held = parse_held(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(held.previous.as_deref(), Some("releases/v1"));
        assert_eq!(
            held.releases,
            BTreeSet::from(["v1".to_string(), "v2".to_string()])
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
