//! Opening the sessions a rollout runs over: one per app host and load balancer, all at once,
//! each re-established if its connection drops, and run as root through sudo on the sides whose
//! inventory says so. A failure here is a pre-flight failure.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;

pub use super::reach::endpoints;
use super::reconnect::{Reconnecting, RetryPolicy};
use super::sudo::{self, AsRoot};
use super::{Connector, Endpoint, Transport, TransportError};
use crate::error::{Error, HostFailure, Result, SudoRefused};
use crate::inventory::Inventory;

/// Open sessions, keyed by plan target (app host name or load-balancer address).
pub type Sessions = HashMap<String, Arc<dyn Transport>>;

/// Opens one session per app host and load balancer, all at once. Any failure is a pre-flight
/// failure: nothing has been changed yet. Each session re-establishes itself if its
/// connection drops later: every command roller sends is safe to repeat.
pub async fn connect(inv: &Inventory, connector: Arc<dyn Connector>) -> Result<Sessions> {
    let endpoints = endpoints(inv)?;
    let results = join_all(endpoints.iter().map(|e| {
        let connector = connector.clone();
        async move {
            Reconnecting::connect(connector, e.clone(), RetryPolicy::default())
                .await
                .map(|s| s as Arc<dyn Transport>)
        }
    }))
    .await;
    let sessions = collect_sessions(endpoints, results).await?;
    run_as_configured(inv, sessions).await
}

/// The inventory key that sends the commands of `name` (an app host or a load balancer, as
/// the plan names them) through sudo, when it is set.
pub fn sudo_key(inv: &Inventory, name: &str) -> Option<&'static str> {
    if inv.balancer.hosts.iter().any(|lb| lb == name) {
        inv.balancer.sudo.then_some("balancer.sudo")
    } else {
        inv.app.sudo.then_some("app.sudo")
    }
}

/// For an endpoint whose commands go through sudo: the inventory key that says so and the SSH
/// user sudo is asked for.
pub fn sudo_of(inv: &Inventory, endpoint: &Endpoint) -> Option<(&'static str, String)> {
    let key = sudo_key(inv, &endpoint.name)?;
    let user = endpoint
        .user
        .clone()
        .unwrap_or_else(|| super::reach::default_user(&inv.ssh));
    Some((key, user))
}

/// Asks sudo on every session whose side says `sudo = true`, all at once, changing nothing:
/// the hosts where it would not run roller's commands as root, each with the rule it needs.
/// `sessions` are the SSH users' own, not yet wrapped; `roller check` asks the same.
pub async fn sudo_refusals(inv: &Inventory, sessions: &Sessions) -> Result<Vec<SudoRefused>> {
    let asked = endpoints(inv)?
        .into_iter()
        .filter_map(|e| sudo_of(inv, &e).map(|(key, user)| (e.name, key, user)))
        .filter_map(|(name, key, user)| {
            let session = sessions.get(&name)?.clone();
            Some(async move { (name, key, user, sudo::probe(session.as_ref()).await) })
        });
    let mut refusals = Vec::new();
    let mut failures = Vec::new();
    for (host, key, user, answer) in join_all(asked).await {
        match answer {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => refusals.push(SudoRefused {
                rule: crate::remote::sudo::rule(&user),
                host,
                user,
                key: key.to_string(),
                refusal: refused.refusal,
                stderr: refused.stderr,
            }),
            Err(e) => failures.push(HostFailure {
                host,
                step: "sudo".into(),
                message: e.to_string(),
            }),
        }
    }
    if !failures.is_empty() {
        failures.sort_by(|a, b| a.host.cmp(&b.host));
        return Err(Error::Preflight { failures });
    }
    refusals.sort_by(|a, b| a.host.cmp(&b.host));
    Ok(refusals)
}

/// Wraps the sessions of each side whose inventory says `sudo = true` in [`AsRoot`], once sudo
/// answered the probe as root on every one of them; otherwise closes them all and fails naming
/// each host that refused, before anything (the deploy lock included) changed anywhere.
pub async fn run_as_configured(inv: &Inventory, sessions: Sessions) -> Result<Sessions> {
    if !inv.app.sudo && !inv.balancer.sudo {
        return Ok(sessions);
    }
    let refusals = match sudo_refusals(inv, &sessions).await {
        Ok(refusals) if refusals.is_empty() => Ok(()),
        Ok(refusals) => Err(Error::Sudo { refusals }),
        Err(e) => Err(e),
    };
    if let Err(e) = refusals {
        for session in sessions.values() {
            session.close().await;
        }
        return Err(e);
    }
    Ok(as_root(inv, sessions))
}

/// Wraps the sessions of each side whose inventory says `sudo = true` in [`AsRoot`], without
/// asking sudo first: for callers that did, with [`sudo_refusals`].
pub fn as_root(inv: &Inventory, sessions: Sessions) -> Sessions {
    sessions
        .into_iter()
        .map(|(name, session)| {
            let session: Arc<dyn Transport> = if sudo_key(inv, &name).is_some() {
                Arc::new(AsRoot::new(session))
            } else {
                session
            };
            (name, session)
        })
        .collect()
}

/// Pairs endpoints with connection results; closes what opened if anything failed.
pub async fn collect_sessions(
    endpoints: Vec<Endpoint>,
    results: Vec<std::result::Result<Arc<dyn Transport>, TransportError>>,
) -> Result<Sessions> {
    let (sessions, failures) = pair_up(endpoints, results);
    if failures.is_empty() {
        Ok(sessions)
    } else {
        for session in sessions.values() {
            session.close().await;
        }
        Err(Error::Preflight { failures })
    }
}

/// The sessions that opened, by host name, and a `connect` failure naming each host that did
/// not.
pub fn pair_up(
    endpoints: Vec<Endpoint>,
    results: Vec<std::result::Result<Arc<dyn Transport>, TransportError>>,
) -> (Sessions, Vec<HostFailure>) {
    let mut sessions = HashMap::new();
    let mut failures = Vec::new();
    for (endpoint, result) in endpoints.into_iter().zip(results) {
        match result {
            Ok(session) => {
                sessions.insert(endpoint.name, session);
            }
            Err(e) => failures.push(HostFailure {
                host: endpoint.name,
                step: "connect".into(),
                message: e.to_string(),
            }),
        }
    }
    (sessions, failures)
}
