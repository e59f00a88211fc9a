//! What an earlier rollout left behind decides what this run may do: which hosts it must
//! redeploy first, what each host ran before, and, for `recover`, where each host goes back.
//!
//! Kept apart from the commands and free of I/O so that every decision can be pinned by a unit
//! test without a host: the state comes in as data, read by the caller from the lock host or a
//! journal.

use std::collections::{BTreeMap, BTreeSet};

use crate::commands::Hints;
use crate::error::{Error, Result, Unfinished};
use crate::inventory::{Slot, Strategy};
use crate::journal::{Progress, RolloutState};

/// What the operator asked for, as far as an earlier rollout matters to it.
#[derive(Debug, Clone, Copy)]
pub enum Asked<'a> {
    /// A new rollout of `release`, under the fresh rollout id `id`.
    Rollout { id: &'a str, release: &'a str },
    /// Finish the rollout in this state.
    Resume(&'a RolloutState),
    /// Return every host to its release from before the rollout in this state.
    Recover(&'a RolloutState),
    /// Blue-green: traffic back to the other slot; no earlier rollout is carried on.
    SwitchBack,
}

impl<'a> Asked<'a> {
    /// The state this run carries on, when it is a resume or a recover.
    pub fn carried_on(self) -> Option<&'a RolloutState> {
        match self {
            Asked::Resume(s) | Asked::Recover(s) => Some(s),
            Asked::Rollout { .. } | Asked::SwitchBack => None,
        }
    }
}

/// What this run takes over from the rollout before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Hosts an earlier run left partway: never skipped, and deployed first.
    pub unfinished: BTreeSet<String>,
    /// Each host's release from before the earlier run, which stays the one `recover` returns
    /// to; `None` when this run starts afresh and pre-flight's view is the "before".
    pub before: Option<BTreeMap<String, Option<String>>>,
    /// Blue-green: the slot that had traffic before the earlier run.
    pub live_slot_before: Option<Slot>,
}

/// Decides what this run carries on from `prior` (the state on the lock host, if any) and from
/// the state a resume or recover names. Refuses a run that would trample an unfinished rollout:
/// another release over it, or another set of load balancers than the one that started it.
pub fn reconcile(
    asked: Asked<'_>,
    prior: Option<&RolloutState>,
    balancers: &[String],
    hints: &Hints,
) -> Result<Reconciled> {
    for state in [prior, asked.carried_on()].into_iter().flatten() {
        if state.status.unfinished() && !state.balancers.is_empty() && state.balancers != balancers
        {
            return Err(Error::from(Unfinished::OtherBalancers {
                id: state.id.clone(),
                release: state.release.clone(),
                theirs: state.balancers.clone(),
                ours: balancers.to_vec(),
            }));
        }
    }
    let previous = match (asked, prior) {
        (Asked::Resume(s) | Asked::Recover(s), _) => Some(s),
        (Asked::SwitchBack, _) => None,
        (Asked::Rollout { id, release }, Some(p)) if p.status.stranded() && p.id != id => {
            if p.release != release {
                return Err(Error::from(Unfinished::InTheWay {
                    id: p.id.clone(),
                    release: p.release.clone(),
                    status: p.status,
                    resume_hint: hints.resume.clone(),
                    recover_hint: hints.recover.clone(),
                }));
            }
            // The same release again: pick up where that one stopped.
            Some(p)
        }
        (Asked::Rollout { .. }, _) => None,
    };
    let Some(previous) = previous else {
        return Ok(Reconciled::default());
    };
    Ok(Reconciled {
        unfinished: previous
            .hosts
            .iter()
            .filter(|(_, progress)| {
                matches!(
                    progress,
                    Progress::Drained | Progress::Switched | Progress::Restarted | Progress::Failed
                )
            })
            .map(|(host, _)| host.clone())
            .collect(),
        before: Some(previous.before.clone()),
        live_slot_before: previous.live_slot,
    })
}

/// Where `recover` sends each host: its release from before the rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverTargets {
    /// Host → release, for every host whose release before the rollout is recorded.
    pub targets: BTreeMap<String, String>,
    /// The release most hosts go back to, which names the recovery; `None` when no host has
    /// one recorded.
    pub release: Option<String>,
    /// Hosts of the inventory with no release recorded: left as they are.
    pub unrecorded: Vec<String>,
}

/// `hosts` are the inventory's app hosts, in its order.
pub fn recover_targets<'h>(
    state: &RolloutState,
    hosts: impl IntoIterator<Item = &'h str>,
) -> RecoverTargets {
    let targets: BTreeMap<String, String> = state
        .before
        .iter()
        .filter_map(|(host, release)| release.clone().map(|r| (host.clone(), r)))
        .collect();
    let unrecorded = hosts
        .into_iter()
        .filter(|host| !targets.contains_key(*host))
        .map(str::to_string)
        .collect();
    RecoverTargets {
        release: most_common(targets.values()),
        targets,
        unrecorded,
    }
}

/// What recovering a blue-green release does: it only ever moved traffic between slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotRecovery {
    /// Traffic never moved, or moved back already: nothing to change.
    Stay,
    /// Traffic goes back to the slot that had it at pre-flight, the other one.
    MoveBack,
}

/// Compares the slot the rollout recorded as live at its pre-flight with the one live now.
/// A state that recorded none cannot say where traffic was: the operator is told how to move
/// it by hand.
pub fn slot_recovery(
    state: &RolloutState,
    live: Slot,
    switch_back_hint: &str,
) -> Result<SlotRecovery> {
    debug_assert_eq!(state.strategy, Strategy::BlueGreen);
    match state.live_slot {
        None => Err(Error::from(Unfinished::NoLiveSlot {
            id: state.id.clone(),
            release: state.release.clone(),
            live,
            switch_back_hint: switch_back_hint.to_string(),
        })),
        Some(before) if before == live => Ok(SlotRecovery::Stay),
        Some(_) => Ok(SlotRecovery::MoveBack),
    }
}

/// The most frequent value; of equally frequent ones, the greatest.
fn most_common<'a>(values: impl Iterator<Item = &'a String>) -> Option<String> {
    let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(v, _)| v.clone())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::journal::Status;

    const OURS: &[&str] = &["10.0.0.5", "10.0.0.6"];
    const FRESH_ID: &str = "ffffffffffffffffffffffffffffffff";

    fn balancers() -> Vec<String> {
        OURS.iter().map(|s| s.to_string()).collect()
    }

    fn hints() -> Hints {
        Hints::for_inventory(std::path::Path::new("roller.toml"))
    }

    /// A rollout of v2 over web-1..web-4 that stopped with web-1 done, web-2 out of the pool and
    /// switched, the rest not started.
    fn prior(status: Status) -> RolloutState {
        RolloutState {
            strategy: Strategy::Rolling,
            kind: Default::default(),
            id: "0123456789abcdef0123456789abcdef".into(),
            app: "shop".into(),
            release: "v2".into(),
            artifact: Some("shop-2.jar".into()),
            artifact_sha256: None,
            batch: "1".parse().unwrap(),
            on_failure: Default::default(),
            max_failed_hosts: 0,
            controller: "deploy@ci".into(),
            started: 1,
            updated: 2,
            status,
            before: BTreeMap::from([
                ("web-1".to_string(), Some("v1".to_string())),
                ("web-2".to_string(), Some("v1".to_string())),
                ("web-3".to_string(), Some("v0".to_string())),
                ("web-4".to_string(), None),
            ]),
            hosts: BTreeMap::from([
                ("web-1".to_string(), Progress::Done),
                ("web-2".to_string(), Progress::Switched),
                ("web-3".to_string(), Progress::Pending),
                ("web-4".to_string(), Progress::Pending),
            ]),
            out_of_pool: vec!["web-2".into()],
            balancers: balancers(),
            live_slot: None,
            found: Vec::new(),
            selected: Vec::new(),
        }
    }

    fn rollout(release: &str) -> Asked<'_> {
        Asked::Rollout {
            id: FRESH_ID,
            release,
        }
    }

    fn names(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn a_first_rollout_starts_afresh() {
        let got = reconcile(rollout("v2"), None, &balancers(), &hints()).unwrap();
        assert_eq!(got, Reconciled::default());
    }

    #[test]
    fn the_same_release_after_an_interruption_mid_batch_redeploys_the_hosts_left_partway() {
        let before = prior(Status::Running);
        let got = reconcile(rollout("v2"), Some(&before), &balancers(), &hints()).unwrap();
        assert_eq!(names(&got.unfinished), ["web-2"]);
        assert_eq!(got.before, Some(before.before.clone()));
    }

    #[test]
    fn every_host_left_drained_switched_restarted_or_failed_counts_as_partway() {
        let mut before = prior(Status::Halted);
        before.hosts = BTreeMap::from([
            ("web-1".to_string(), Progress::Drained),
            ("web-2".to_string(), Progress::Switched),
            ("web-3".to_string(), Progress::Restarted),
            ("web-4".to_string(), Progress::Failed),
            ("web-5".to_string(), Progress::RolledBack),
            ("web-6".to_string(), Progress::Done),
            ("web-7".to_string(), Progress::Pending),
        ]);
        let got = reconcile(rollout("v2"), Some(&before), &balancers(), &hints()).unwrap();
        assert_eq!(names(&got.unfinished), ["web-1", "web-2", "web-3", "web-4"]);
    }

    #[test]
    fn another_release_over_an_unfinished_rollout_is_refused_naming_resume_and_recover() {
        for status in [Status::Running, Status::Halted, Status::Incomplete] {
            let before = prior(status);
            let err = reconcile(rollout("v3"), Some(&before), &balancers(), &hints()).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(&err, Error::Unfinished(u) if matches!(&**u, Unfinished::InTheWay { release, .. } if release == "v2")),
                "{err:?}"
            );
            assert!(message.contains("of v2 is unfinished"), "{message}");
            assert!(
                message.contains("roller resume --inventory roller.toml"),
                "{message}"
            );
            assert!(
                message.contains("roller recover --inventory roller.toml"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_finished_rolled_back_or_interrupted_rollout_does_not_hold_back_a_new_release() {
        for status in [
            Status::Succeeded,
            Status::RolledBack,
            Status::Recovered,
            Status::Interrupted,
        ] {
            let before = prior(status);
            let got = reconcile(rollout("v3"), Some(&before), &balancers(), &hints()).unwrap();
            assert_eq!(got, Reconciled::default(), "{status:?}");
            let got = reconcile(rollout("v2"), Some(&before), &balancers(), &hints()).unwrap();
            assert_eq!(got, Reconciled::default(), "{status:?}");
        }
    }

    #[test]
    fn a_rollout_never_carries_on_its_own_state() {
        let before = prior(Status::Running);
        let asked = Asked::Rollout {
            id: &before.id,
            release: "v3",
        };
        let got = reconcile(asked, Some(&before), &balancers(), &hints()).unwrap();
        assert_eq!(got, Reconciled::default());
    }

    #[test]
    fn resume_carries_on_the_named_state_whatever_the_lock_host_holds() {
        let named = prior(Status::Interrupted);
        let mut other = prior(Status::Succeeded);
        other.release = "v9".into();
        other.before.clear();
        let got = reconcile(Asked::Resume(&named), Some(&other), &balancers(), &hints()).unwrap();
        assert_eq!(names(&got.unfinished), ["web-2"]);
        assert_eq!(got.before, Some(named.before.clone()));
        let got = reconcile(Asked::Recover(&named), None, &balancers(), &hints()).unwrap();
        assert_eq!(names(&got.unfinished), ["web-2"]);
    }

    #[test]
    fn an_unfinished_rollout_of_other_load_balancers_is_refused_for_every_command() {
        let mut theirs = prior(Status::Running);
        theirs.balancers = vec!["10.0.0.9".into()];
        let asks = [
            rollout("v2"),
            Asked::Resume(&theirs),
            Asked::Recover(&theirs),
            Asked::SwitchBack,
        ];
        for asked in asks {
            let err = reconcile(asked, Some(&theirs), &balancers(), &hints()).unwrap_err();
            assert!(
                err.to_string()
                    .contains("was run with the load balancers [10.0.0.9], this inventory names [10.0.0.5, 10.0.0.6]"),
                "{asked:?}: {err}"
            );
        }
    }

    #[test]
    fn a_state_from_before_load_balancers_were_recorded_is_taken_as_ours() {
        let mut old = prior(Status::Running);
        old.balancers.clear();
        let got = reconcile(rollout("v2"), Some(&old), &balancers(), &hints()).unwrap();
        assert_eq!(names(&got.unfinished), ["web-2"]);
    }

    #[test]
    fn a_finished_rollout_of_other_load_balancers_is_no_obstacle() {
        let mut theirs = prior(Status::Succeeded);
        theirs.balancers = vec!["10.0.0.9".into()];
        assert!(reconcile(rollout("v3"), Some(&theirs), &balancers(), &hints()).is_ok());
    }

    #[test]
    fn a_switch_back_carries_nothing_on() {
        let before = prior(Status::Running);
        let got = reconcile(Asked::SwitchBack, Some(&before), &balancers(), &hints()).unwrap();
        assert_eq!(got, Reconciled::default());
    }

    #[test]
    fn the_live_slot_before_comes_from_the_state_carried_on() {
        let mut before = prior(Status::Interrupted);
        before.strategy = Strategy::BlueGreen;
        before.live_slot = Some(Slot::Green);
        let got = reconcile(Asked::Recover(&before), None, &balancers(), &hints()).unwrap();
        assert_eq!(got.live_slot_before, Some(Slot::Green));
    }

    #[test]
    fn recover_sends_each_recorded_host_back_and_names_the_unrecorded() {
        let state = prior(Status::Running);
        let got = recover_targets(&state, ["web-1", "web-2", "web-3", "web-4", "web-5"]);
        assert_eq!(
            got.targets,
            BTreeMap::from([
                ("web-1".to_string(), "v1".to_string()),
                ("web-2".to_string(), "v1".to_string()),
                ("web-3".to_string(), "v0".to_string()),
            ])
        );
        assert_eq!(got.release.as_deref(), Some("v1"));
        assert_eq!(got.unrecorded, ["web-4", "web-5"]);
    }

    #[test]
    fn a_tie_between_releases_before_names_the_recovery_after_the_greatest() {
        let mut state = prior(Status::Running);
        state.before = BTreeMap::from([
            ("web-1".to_string(), Some("v1".to_string())),
            ("web-2".to_string(), Some("v0".to_string())),
        ]);
        assert_eq!(
            recover_targets(&state, ["web-1", "web-2"])
                .release
                .as_deref(),
            Some("v1")
        );
    }

    #[test]
    fn recover_with_no_release_recorded_has_no_target() {
        let mut state = prior(Status::Running);
        state.before.clear();
        let got = recover_targets(&state, ["web-1"]);
        assert!(got.targets.is_empty());
        assert_eq!(got.release, None);
        assert_eq!(got.unrecorded, ["web-1"]);
    }

    #[test]
    fn a_blue_green_recovery_moves_traffic_back_only_if_it_moved() {
        let mut state = prior(Status::Interrupted);
        state.strategy = Strategy::BlueGreen;
        state.live_slot = Some(Slot::Blue);
        let hint = "roller switch-back --inventory roller.toml";
        assert_eq!(
            slot_recovery(&state, Slot::Blue, hint).unwrap(),
            SlotRecovery::Stay
        );
        assert_eq!(
            slot_recovery(&state, Slot::Green, hint).unwrap(),
            SlotRecovery::MoveBack
        );
    }

    #[test]
    fn a_blue_green_recovery_without_a_recorded_slot_says_how_to_move_traffic() {
        let mut state = prior(Status::Interrupted);
        state.strategy = Strategy::BlueGreen;
        let err = slot_recovery(
            &state,
            Slot::Green,
            "roller switch-back --inventory roller.toml",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "traffic is on green: run `roller switch-back --inventory roller.toml` to move it to blue"
            ),
            "{err}"
        );
    }
}
