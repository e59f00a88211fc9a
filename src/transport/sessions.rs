//! Opening the sessions a rollout runs over: one per app host and load balancer, all at once,
//! each re-established if its connection drops. A failure here is a pre-flight failure.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;

pub use super::reach::endpoints;
use super::reconnect::{Reconnecting, RetryPolicy};
use super::{Connector, Endpoint, Transport, TransportError};
use crate::error::{Error, HostFailure, Result};
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
    collect_sessions(endpoints, results).await
}

/// Pairs endpoints with connection results; closes what opened if anything failed.
pub async fn collect_sessions(
    endpoints: Vec<Endpoint>,
    results: Vec<std::result::Result<Arc<dyn Transport>, TransportError>>,
) -> Result<Sessions> {
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
    if failures.is_empty() {
        Ok(sessions)
    } else {
        for session in sessions.values() {
            session.close().await;
        }
        Err(Error::Preflight { failures })
    }
}
