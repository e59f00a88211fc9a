//! `roller history`: past rollouts, newest first, from the history file on the lock host.
//! Read-only, like `status`: it takes no lock and writes nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result, StateError};
use crate::history::{self, Record, Rejected};
use crate::inventory::Inventory;
use crate::selection::Selection;
use crate::session;

/// What `roller history` is asked.
pub struct HistoryRequest {
    pub inventory: Inventory,
    /// Show at most this many records, the newest.
    pub limit: usize,
    /// Only rollouts that changed or kept one of these hosts, each shown with these hosts'
    /// outcomes alone.
    pub selection: Selection,
}

#[derive(Debug, Clone, Serialize)]
pub struct History {
    /// Newest first.
    pub rollouts: Vec<Record>,
    /// Lines of the file that are not records roller wrote: left out, with why.
    pub rejected: Vec<Rejected>,
    /// `host:path` of the file read.
    pub file: String,
}

pub async fn history(request: HistoryRequest) -> Result<History> {
    let inv = &request.inventory;
    let selected: Option<BTreeSet<String>> = request.selection.resolve(inv)?;
    let file = history::file(&inv.balancer.state_dir, &inv.app.name);
    let lb = session::connect_lock_host(inv).await?;
    let read = lb
        .exec(
            &crate::remote::state::read(&file),
            None,
            Duration::from_secs(30),
        )
        .await;
    lb.close().await;
    let out = read.map_err(|e| {
        Error::from(StateError::Read {
            reason: e.to_string(),
        })
    })?;
    if !out.success() {
        return Err(Error::from(StateError::Read {
            reason: out.stderr_text(),
        }));
    }
    let (mut rollouts, rejected) = history::parse(&String::from_utf8_lossy(&out.stdout));
    if let Some(selected) = &selected {
        for record in &mut rollouts {
            record.hosts.retain(|h| selected.contains(&h.name));
        }
        rollouts.retain(|r| !r.hosts.is_empty());
    }
    rollouts.truncate(request.limit);
    Ok(History {
        rollouts,
        rejected,
        file: format!("{}:{file}", inv.balancer.lock_host),
    })
}

impl History {
    /// For people: two lines per rollout, newest first, then the lines left out.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if self.rollouts.is_empty() {
            out.push_str(&format!("no rollout recorded in {}\n", self.file));
        }
        for r in &self.rollouts {
            let when = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(r.started),
            );
            let took = humantime::format_duration(Duration::from_secs(r.duration_ms / 1000));
            let result = serde_json::to_value(r.result)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let strategy = serde_json::to_value(r.strategy)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            out.push_str(&format!(
                "{when}  {}  {} {}  {strategy}, batch {} ({} batches)  {result} in {took}  by {}\n",
                &r.id[..8],
                r.command,
                r.release,
                r.batch,
                r.batches,
                r.who,
            ));
            let hosts: Vec<String> = r
                .hosts
                .iter()
                .map(|h| {
                    let outcome = serde_json::to_value(h.outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    format!(
                        "{} {outcome} ({})",
                        h.name,
                        h.release.as_deref().unwrap_or("no release")
                    )
                })
                .collect();
            out.push_str(&format!("    {}\n", hosts.join(", ")));
        }
        for r in &self.rejected {
            out.push_str(&format!(
                "warning: {} line {} left out: {}\n",
                self.file, r.line, r.reason
            ));
        }
        out
    }
}
