//! A rolling rollout batch by batch: order, drains, rollback and the failure policies.

use super::*;

#[tokio::test]
async fn a_good_release_reaches_every_host_one_batch_at_a_time() {
    let world = world();
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::Succeeded);
    assert!(
        report
            .hosts
            .iter()
            .all(|h| h.outcome == HostOutcome::Updated && h.in_pool)
    );
    assert_eq!(releases(&world), vec![("v2".into(), "v2".into()); 3]);
    let w = world.lock().unwrap();
    // One reload per batch boundary: web-1 out; web-1 back and web-2 out in one rewrite; then
    // web-2 back and web-3 out; then web-3 back. Four for three batches, one host down at a time.
    assert_eq!(w.upstream_history.len(), 4, "{:#?}", w.upstream_history);
    for (i, content) in w.upstream_history.iter().enumerate() {
        let downs = content.matches(" down;").count();
        assert_eq!(downs, if i < 3 { 1 } else { 0 }, "{content}");
        if i < 3 {
            assert!(
                content.contains(&format!("10.0.1.{}:8080 down;", i + 1)),
                "{content}"
            );
        }
    }
    assert!(!w.upstream.contains("down"));
    drop(w);
    // Saved at the start, with every pool change (where it leads), and at the end.
    let saved = world.lock().unwrap().saved_states.clone();
    let (p, d) = (Progress::Pending, Progress::Drained);
    let done = Progress::Done;
    assert_eq!(
        saved.iter().map(progress).collect::<Vec<_>>(),
        vec![
            vec![p, p, p],
            vec![d, p, p],
            vec![done, d, p],
            vec![done, done, d],
            vec![done; 3],
            vec![done; 3],
        ]
    );
    assert!(saved[..5].iter().all(|s| s.status == Status::Running));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Succeeded);
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn within_a_batch_the_host_changes_only_after_it_left_the_pool_and_drained() {
    let world = world();
    // A moment without connections is not a drain: one opens again after it.
    world.lock().unwrap().in_flight = vec![3, 1, 0, 2];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);

    let calls = fleet.calls();
    let position = |pred: &dyn Fn(&Call) -> bool| calls.iter().position(pred).unwrap();
    let exec_on = |target: &'static str, marker: &'static str| move |c: &Call| matches!(c, Call::Exec { target: t, command, .. } if t == target && command.contains(marker));
    let removed = position(&exec_on("lb-1", ".roller-new"));
    let drained_polls = calls
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    let last_busy_poll = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .map(|(i, _)| i)
        .nth(3)
        .unwrap();
    let switched = position(&exec_on("web-1", "mv -T"));
    let restarted = position(
        &|c: &Call| matches!(c, Call::Exec { target, command, .. } if target == "web-1" && command == "restart-app"),
    );
    let checked = restarted
        + calls[restarted..]
            .iter()
            .position(|c| matches!(c, Call::HttpGet { target, .. } if target == "web-1"))
            .unwrap();
    assert!(removed < last_busy_poll && last_busy_poll < switched);
    // After the last busy poll, quiet polls for balancer.drain_quiet (100ms, 50ms apart).
    let quiet_polls = calls[last_busy_poll + 1..switched]
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    assert!(quiet_polls >= 3, "{quiet_polls} quiet polls");
    assert!(
        switched < restarted && restarted < checked,
        "{switched} {restarted} {checked}"
    );
    // Each of the three batches polls until it has been quiet for a while.
    assert!(drained_polls >= 4 + 3 + 3 + 3, "{drained_polls} polls");
}

#[tokio::test]
async fn once_no_worker_from_before_the_reload_is_left_one_sample_without_connections_is_the_drain()
{
    let world = world();
    {
        let mut w = world.lock().unwrap();
        w.reports_retiring = true;
        w.in_flight = vec![2, 1, 0];
    }
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    assert_eq!(result.unwrap().outcome, Outcome::Succeeded);
    let polls = fleet
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::Exec { command, .. } if command.starts_with("ss -Htn")))
        .count();
    // Batch 1 waits out its two busy samples, then each batch stops at its first quiet one:
    // no quiet window is waited once nothing routes with the old pool.
    assert_eq!(polls, 3 + 1 + 1);
}

#[tokio::test]
async fn an_unhealthy_release_is_rolled_back_in_its_batch_and_goes_no_further() {
    let world = world();
    world.lock().unwrap().healthy = vec!["v1".into()];
    let fleet = fleet(world.clone());
    let (result, events) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = report.failure.as_ref().unwrap();
    assert_eq!((failure.batch, failure.failure.host.as_str()), (1, "web-1"));
    assert_eq!(failure.failure.step, "health-check");
    assert!(failure.failure.message.contains("HTTP 503"), "{failure:?}");
    let outcomes: Vec<_> = report
        .hosts
        .iter()
        .map(|h| (h.outcome, h.in_pool))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert_eq!(report.hosts[0].release.as_deref(), Some("v1"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    assert!(!world.lock().unwrap().upstream.contains("down"));
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::RolledBack, Progress::Pending, Progress::Pending]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
    // Later batches were never touched beyond pre-flight and staging.
    for host in ["web-2", "web-3"] {
        assert!(
            fleet
                .commands(host)
                .iter()
                .all(|c| !c.contains("mv -T") && c != "restart-app"),
            "{host} was changed"
        );
    }
    assert!(
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.state == StepState::Failed)
    );
}

#[tokio::test]
async fn a_host_that_cannot_be_restored_stays_out_of_the_pool_and_is_reported() {
    let world = world();
    world.lock().unwrap().broken = vec!["web-1".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();

    assert_eq!(report.outcome, Outcome::RollbackIncomplete);
    assert_eq!(report.hosts[0].outcome, HostOutcome::Failed);
    assert!(!report.hosts[0].in_pool);
    assert!(
        world
            .lock()
            .unwrap()
            .upstream
            .contains("10.0.1.1:8080 down;")
    );
    assert_eq!(report.recovery.len(), 1);
    assert!(
        report.recovery[0].contains("web-1"),
        "{:?}",
        report.recovery
    );
    assert!(report.recovery[0].contains("/etc/nginx/conf.d/shop.conf"));
    // What resume and recover read agrees with the report.
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Incomplete);
    assert_eq!(last.hosts["web-1"], Progress::Failed);
    assert_eq!(last.out_of_pool, ["web-1"]);
}

#[tokio::test]
async fn a_changed_host_key_stops_everything_before_any_command() {
    let world = world();
    let fleet = fleet(world.clone()).refuse(
        "web-2",
        TransportError::HostKeyChanged {
            host: "10.0.1.2".into(),
            fingerprint: "SHA256:abc".into(),
            known_hosts: "/dev/null".into(),
            line: 3,
        },
    );
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].host, "web-2");
            assert!(failures[0].message.contains("does not match"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(fleet.calls().is_empty());
}

#[tokio::test]
async fn a_failing_nginx_test_stops_everything_before_a_host_leaves_the_pool() {
    let world = world();
    world.lock().unwrap().lb_test_fails = true;
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    match result {
        Err(Error::Preflight { failures }) => {
            assert_eq!(failures[0].host, "lb-1");
            assert!(failures[0].message.contains("unknown directive"));
        }
        other => panic!("expected a pre-flight failure, got {other:?}"),
    }
    assert!(world.lock().unwrap().upstream_history.is_empty());
    assert!(fleet.commands("web-1").iter().all(|c| !c.contains(".part")));
}

#[tokio::test]
async fn a_drain_that_never_ends_fails_the_batch_without_touching_the_host() {
    let world = world();
    world.lock().unwrap().in_flight = vec![1; 1000];
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(2)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().failure.step, "drain");
    assert!(
        report
            .failure
            .as_ref()
            .unwrap()
            .failure
            .message
            .contains("balancer.drain_timeout (2s) ended the wait, not the drain: 1 connection(s)"),
        "{:?}",
        report.failure
    );
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    assert!(!world.lock().unwrap().upstream.contains("down"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}

#[tokio::test]
async fn a_drain_interrupted_by_new_connections_is_not_taken_for_done() {
    let world = world();
    // Never two quiet polls in a row.
    world.lock().unwrap().in_flight = [0, 1].repeat(1000);
    let fleet = fleet(world.clone());
    let (result, _) = rollout(&fleet, BatchSize::Hosts(1)).await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    let failure = &report.failure.as_ref().unwrap().failure;
    assert_eq!(failure.step, "drain");
    assert!(
        failure.message.contains("ended the wait, not the drain"),
        "{failure:?}"
    );
    assert!(fleet.commands("web-1").iter().all(|c| c != "restart-app"));
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}

#[tokio::test]
async fn rollback_all_undoes_earlier_batches_too_draining_them_first() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackAll, 0),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::RolledBack, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
    // web-1 was taken out of the pool again before it was switched back: web-1 out; web-1
    // back with web-2 out; web-2 back after its rollback; web-1 out for its undo; all back.
    let w = world.lock().unwrap();
    let undo_out = w
        .upstream_history
        .iter()
        .rposition(|u| u.contains("10.0.1.1:8080 down;"))
        .unwrap();
    assert_eq!(undo_out, 3, "{:#?}", w.upstream_history);
    assert_eq!(w.upstream_history.len(), 5, "{:#?}", w.upstream_history);
    assert!(!w.upstream.contains("down"));
    drop(w);
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [
            Progress::RolledBack,
            Progress::RolledBack,
            Progress::Pending
        ]
    );
}

#[tokio::test]
async fn halt_leaves_the_failed_batch_out_of_the_pool_and_says_how_to_go_on() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::Halt, 0),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::Halted);
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Halted, false),
            (HostOutcome::Untouched, true),
            (HostOutcome::Untouched, true)
        ]
    );
    assert!(
        world
            .lock()
            .unwrap()
            .upstream
            .contains("10.0.1.1:8080 down;")
    );
    assert_eq!(world.lock().unwrap().current["web-1"], "v2");
    assert!(
        report.recovery[0].contains("roller resume"),
        "{:?}",
        report.recovery
    );
    assert!(report.recovery[0].contains("roller recover"));
    // Resume finds the halted host out of the pool, restarted on the new release.
    let last = last_saved(&world);
    assert_eq!(last.status, Status::Halted);
    assert_eq!(last.out_of_pool, ["web-1"]);
    assert_eq!(
        progress(&last),
        [Progress::Restarted, Progress::Pending, Progress::Pending]
    );
}

#[tokio::test]
async fn max_failed_hosts_rolls_a_failing_host_back_alone_and_carries_on() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackBatch, 1),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.outcome, Outcome::RolledBack);
    assert!(report.failure.is_none());
    assert_eq!(
        outcomes(&report),
        vec![
            (HostOutcome::Updated, true),
            (HostOutcome::RolledBack, true),
            (HostOutcome::Updated, true)
        ]
    );
    assert_eq!(
        releases(&world),
        vec![
            ("v2".into(), "v2".into()),
            ("v1".into(), "v1".into()),
            ("v2".into(), "v2".into())
        ]
    );
    assert!(
        report.headline().contains("but web-2"),
        "{}",
        report.headline()
    );
    let last = last_saved(&world);
    assert_eq!(last.status, Status::RolledBack);
    assert_eq!(
        progress(&last),
        [Progress::Done, Progress::RolledBack, Progress::Done]
    );
    assert!(last.out_of_pool.is_empty(), "{last:?}");
}

#[tokio::test]
async fn one_failure_too_many_fails_the_batch() {
    let world = world();
    world.lock().unwrap().sick_on_v2 = vec!["web-1".into(), "web-2".into()];
    let fleet = fleet(world.clone());
    let (result, _) = rollout_with(
        &fleet,
        BatchSize::Hosts(1),
        options(FailurePolicy::RollbackBatch, 1),
        executor::never_interrupted(),
    )
    .await;
    let report = result.unwrap();
    assert_eq!(report.failure.as_ref().unwrap().batch, 2);
    assert_eq!(releases(&world), vec![("v1".into(), "v1".into()); 3]);
}
