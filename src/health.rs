//! Deciding that a freshly restarted host is ready for traffic.
//!
//! The default check is an HTTP GET made from the host itself through its SSH connection, so a
//! health endpoint bound to a private interface needs no extra network path from the controller.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::transport::Transport;

/// What to ask and what counts as healthy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HealthSpec {
    pub address: String,
    pub port: u16,
    pub path: String,
    pub expect_status: u16,
    #[serde(with = "crate::inventory::human")]
    pub interval: Duration,
    #[serde(with = "crate::inventory::human")]
    pub timeout: Duration,
    pub successes: u32,
}

impl HealthSpec {
    /// The inventory's health check against `address:port`: what a restarted host must pass.
    pub fn wait(address: &str, port: u16, inv: &crate::inventory::Inventory) -> HealthSpec {
        HealthSpec {
            address: address.to_string(),
            port,
            path: inv.health.path.clone(),
            expect_status: inv.health.expect_status,
            interval: inv.health.interval,
            timeout: inv.health.timeout,
            successes: inv.health.successes,
        }
    }

    /// A single look at a host's health, as pre-flight and the capacity guard take it.
    pub fn probe(address: &str, inv: &crate::inventory::Inventory) -> HealthSpec {
        HealthSpec {
            timeout: inv.health.interval,
            successes: 1,
            ..HealthSpec::wait(address, inv.app.port, inv)
        }
    }
}

#[async_trait]
pub trait HealthCheck: Send + Sync {
    /// One probe: `Ok` when the host answers as expected right now.
    async fn probe(
        &self,
        transport: &dyn Transport,
        spec: &HealthSpec,
        deadline: Duration,
    ) -> Result<(), String>;

    /// Returns once `spec.successes` consecutive probes passed, or the last observation as the
    /// error once `spec.timeout` has passed.
    async fn wait_healthy(
        &self,
        transport: &dyn Transport,
        spec: &HealthSpec,
    ) -> Result<(), String>;
}

/// HTTP through the SSH connection's direct-tcpip channel.
pub struct HttpOverSsh;

#[async_trait]
impl HealthCheck for HttpOverSsh {
    async fn probe(
        &self,
        transport: &dyn Transport,
        spec: &HealthSpec,
        deadline: Duration,
    ) -> Result<(), String> {
        match transport
            .http_get(&spec.address, spec.port, &spec.path, deadline)
            .await
        {
            Ok(status) if status == spec.expect_status => Ok(()),
            Ok(status) => Err(format!("HTTP {status}, expected {}", spec.expect_status)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn wait_healthy(
        &self,
        transport: &dyn Transport,
        spec: &HealthSpec,
    ) -> Result<(), String> {
        let deadline = Instant::now() + spec.timeout;
        let mut in_a_row = 0;
        let mut last;
        loop {
            let started = Instant::now();
            let probe_deadline = deadline
                .saturating_duration_since(started)
                .min(Duration::from_secs(5))
                .max(Duration::from_millis(100));
            match transport
                .http_get(&spec.address, spec.port, &spec.path, probe_deadline)
                .await
            {
                Ok(status) if status == spec.expect_status => {
                    in_a_row += 1;
                    if in_a_row >= spec.successes {
                        return Ok(());
                    }
                    last = format!("HTTP {status}");
                }
                Ok(status) => {
                    in_a_row = 0;
                    last = format!("HTTP {status}, expected {}", spec.expect_status);
                }
                Err(e) => {
                    in_a_row = 0;
                    last = e.to_string();
                }
            }
            let next = started + spec.interval;
            if next >= deadline {
                return Err(format!(
                    "not healthy within {}: GET {} on port {} last gave {last}",
                    humantime::format_duration(spec.timeout),
                    spec.path,
                    spec.port
                ));
            }
            tokio::time::sleep_until(next).await;
        }
    }
}
