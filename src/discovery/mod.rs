//! Hosts found at run time instead of listed in the inventory: an autoscaled fleet changes
//! between releases, so its hosts are asked of the cloud's API when a command needs them.
//!
//! The boundary is deliberately narrow: a source yields [`FoundHost`]s (a name and an address,
//! both checked like `[[hosts]]` entries, since they come from outside), and [`into_hosts`]
//! turns them into the inventory's hosts. Everything after that (plan, executor, lock, journal)
//! sees an ordinary host list. A rollout records what it found in its state, so that `resume`
//! and `recover` act on the same hosts even if the group scaled in between.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::inventory::{Host, is_address, is_word};

pub mod ec2;

pub use ec2::{AddressKind, Ec2Config};

/// Where an inventory's hosts come from when it has no `[[hosts]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Discovery {
    Ec2(Ec2Config),
}

impl Discovery {
    /// What was asked, for messages: "EC2 instances in eu-west-1 with tag:Role=shop".
    pub fn describe(&self) -> String {
        match self {
            Discovery::Ec2(c) => c.describe(),
        }
    }

    /// The SSH login on found hosts, when it is not `ssh.user`.
    pub fn user(&self) -> Option<&str> {
        match self {
            Discovery::Ec2(c) => c.user.as_deref(),
        }
    }

    /// Asks the source. No match is an error naming what was asked, never "every host".
    pub async fn find(&self) -> Result<Vec<FoundHost>> {
        let found = match self {
            Discovery::Ec2(c) => ec2::find(c).await?,
        };
        if found.is_empty() {
            return Err(Error::Discovery(format!(
                "no running host found: {}",
                self.describe()
            )));
        }
        Ok(found)
    }
}

/// One host as a source reported it, and as the rollout state records it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FoundHost {
    pub name: String,
    pub address: String,
}

impl FoundHost {
    /// What is wrong with it by the rules `[[hosts]]` entries follow; `origin` names where it
    /// came from (an instance id, a state file).
    pub fn problem(&self, origin: &str) -> Option<String> {
        if !is_word(&self.name) {
            return Some(format!(
                "{origin}: host name {:?} is not a word (letters, digits, '.', '_', '-')",
                shown(&self.name)
            ));
        }
        if !is_address(&self.address) {
            return Some(format!(
                "{origin}: address {:?} of {} is not a host name or IP address",
                shown(&self.address),
                self.name
            ));
        }
        None
    }
}

fn shown(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Refuses duplicate names or addresses: two hosts sharing one would have one of them rolled
/// twice and the other never.
pub fn check_unique(found: &[(String, FoundHost)]) -> std::result::Result<(), String> {
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut addresses: BTreeMap<&str, &str> = BTreeMap::new();
    for (origin, host) in found {
        if let Some(other) = names.insert(&host.name, origin) {
            return Err(format!(
                "{other} and {origin} both have the name {:?}: host names must be unique",
                host.name
            ));
        }
        if let Some(other) = addresses.insert(&host.address, origin) {
            return Err(format!(
                "{other} and {origin} both have the address {:?}",
                host.address
            ));
        }
    }
    Ok(())
}

/// The inventory's hosts for what was found: sorted by name, so that batches do not depend on
/// the order the API answered in.
pub fn into_hosts(found: &[FoundHost], user: Option<&str>) -> Vec<Host> {
    let mut hosts: Vec<Host> = found
        .iter()
        .map(|f| Host {
            name: f.name.clone(),
            address: f.address.clone(),
            user: user.map(str::to_string),
            ..Host::default()
        })
        .collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    hosts
}
