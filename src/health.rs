//! Deciding that a freshly restarted host is ready for traffic.
//!
//! The default check is an HTTP GET made from the host itself through its SSH connection, so a
//! health endpoint bound to a private interface needs no extra network path from the controller.
//! Where the host's sshd refuses port forwarding (CIS-hardened images), the same GET is made by a
//! command on the host (curl, wget or bash, whichever it has), or the inventory's
//! `health.command` runs there instead.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::remote;
use crate::transport::{Transport, TransportError};

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
    /// `health.command`, for hosts that refuse port forwarding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

/// The longest one HTTP probe may take, in a single look as in polling.
const ONE_PROBE: Duration = Duration::from_secs(5);

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
            command: inv.health.command.clone(),
        }
    }

    /// A single look at a host's health, as pre-flight and the capacity guard take it. Its
    /// deadline is a probe's own, not the polling interval: a short interval makes a restarted
    /// host count as healthy sooner, and must not make a slow health endpoint look down.
    pub fn probe(address: &str, inv: &crate::inventory::Inventory) -> HealthSpec {
        let look = inv.health.interval.max(ONE_PROBE);
        HealthSpec {
            interval: look,
            timeout: look,
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
    ) -> Result<(), ProbeError>;

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
    ) -> Result<(), ProbeError> {
        match status(transport, spec, deadline).await {
            Ok(status) if status == spec.expect_status => Ok(()),
            Ok(status) => Err(ProbeError::Unhealthy(format!(
                "HTTP {status}, expected {}",
                spec.expect_status
            ))),
            Err(e) => Err(e),
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
                .min(ONE_PROBE)
                .max(Duration::from_millis(100));
            match status(transport, spec, probe_deadline).await {
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

/// Why a probe did not find the host healthy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The app answered badly or not at all, or the host could not be asked: a release, or a
    /// moment, may change that.
    #[error("{0}")]
    Unhealthy(String),
    /// The host refuses port forwarding and has no way to check its app from itself either (no
    /// curl, wget or bash; a `health.command` its shell cannot run): no health can ever be
    /// known there, which pre-flight refuses outright.
    #[error("{0}")]
    CannotCheck(String),
}

/// The app's HTTP status, through a forwarded channel or, where the host's sshd refuses
/// forwarding, from a command on the host itself.
async fn status(
    transport: &dyn Transport,
    spec: &HealthSpec,
    deadline: Duration,
) -> Result<u16, ProbeError> {
    let refused = match transport
        .http_get(&spec.address, spec.port, &spec.path, deadline)
        .await
    {
        Ok(status) => return Ok(status),
        Err(refused @ TransportError::ForwardingRefused { .. }) => refused,
        Err(e) => return Err(ProbeError::Unhealthy(e.to_string())),
    };
    let unhealthy = |why: String| ProbeError::Unhealthy(format!("{refused}; {why}"));
    let cannot_check = |why: String| {
        ProbeError::CannotCheck(format!(
            "{refused}; checking from the host itself failed: {why}"
        ))
    };
    if let Some(command) = &spec.command {
        let out = transport
            .exec(&remote::health::configured(command), None, deadline)
            .await
            .map_err(|e| unhealthy(format!("health.command on the host: {e}")))?;
        return if out.success() {
            Ok(spec.expect_status)
        } else if matches!(out.status, Some(126 | 127)) {
            // The shell could not run it at all: no health can be known on this host.
            Err(cannot_check(format!(
                "health.command could not run (exit {}): {}",
                out.status.unwrap_or_default(),
                out.stderr_text().trim()
            )))
        } else {
            // The command ran and said no: the app is unhealthy, as a 503 would say.
            Err(unhealthy(format!(
                "health.command on the host exited {}: {}",
                out.status
                    .map_or("without a status".into(), |s| s.to_string()),
                out.stderr_text().trim()
            )))
        };
    }
    let command =
        remote::health::http_status(&spec.address, spec.port, &spec.path, deadline.as_secs());
    let out = transport
        .exec(&command, None, deadline)
        .await
        .map_err(|e| unhealthy(format!("from the host itself: {e}")))?;
    match out.stdout_text().trim().parse::<u16>() {
        Ok(status) if (100..600).contains(&status) => Ok(status),
        // Nothing answered: the app is down, which a rollout may well fix.
        _ if out.status != Some(remote::health::NO_CLIENT) => Err(unhealthy(format!(
            "from the host itself: no HTTP answer from {}:{}",
            spec.address, spec.port
        ))),
        _ => Err(cannot_check(out.stderr_text().trim().to_string())),
    }
}
