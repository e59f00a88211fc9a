//! EC2 as a host source, through the `aws` CLI's JSON rather than the AWS SDK crates: the CLI
//! already resolves every credential source (environment, profile, SSO, instance role), the
//! region and `AWS_ENDPOINT_URL`, and paginates, while the SDK crates would multiply roller's
//! build time and binary size (the README's "Hosts from EC2" has the figures).
//!
//! Parsing DescribeInstances output is pure and tested on its own; running the CLI is a thin
//! shell around it, bounded in time.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::{FoundHost, check_unique};
use crate::error::{Error, Result};

/// The CLI retries and paginates on its own; this bounds all of it.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// `[discovery.ec2]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ec2Config {
    /// `None`: the CLI's own resolution (`AWS_REGION`, `AWS_DEFAULT_REGION`, the profile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// DescribeInstances filters, each with one or more values.
    pub filters: BTreeMap<String, Vec<String>>,
    pub address: AddressKind,
    /// The tag that names hosts; an instance without it is named by its instance id.
    pub name_tag: String,
    /// The SSH login on the instances, when it is not `ssh.user` (an image's `ec2-user`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Which of an instance's addresses roller connects to and writes into the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AddressKind {
    PrivateIp,
    PublicIp,
    PrivateDns,
    PublicDns,
}

impl AddressKind {
    pub const NAMES: [&'static str; 4] = ["private-ip", "public-ip", "private-dns", "public-dns"];

    pub fn parse(s: &str) -> Option<AddressKind> {
        match s {
            "private-ip" => Some(AddressKind::PrivateIp),
            "public-ip" => Some(AddressKind::PublicIp),
            "private-dns" => Some(AddressKind::PrivateDns),
            "public-dns" => Some(AddressKind::PublicDns),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// The DescribeInstances field.
    fn field(self) -> &'static str {
        match self {
            AddressKind::PrivateIp => "PrivateIpAddress",
            AddressKind::PublicIp => "PublicIpAddress",
            AddressKind::PrivateDns => "PrivateDnsName",
            AddressKind::PublicDns => "PublicDnsName",
        }
    }
}

impl Ec2Config {
    pub fn describe(&self) -> String {
        let filters = self
            .filters
            .iter()
            .map(|(k, v)| format!("{k}={}", v.join(",")))
            .collect::<Vec<_>>()
            .join(", ");
        match &self.region {
            Some(region) => format!("EC2 instances in {region} with {filters}"),
            None => format!("EC2 instances with {filters}"),
        }
    }

    /// `aws` arguments for one DescribeInstances call. Filters go as JSON, which takes any
    /// value (the CLI's shorthand syntax splits on commas).
    pub fn cli_args(&self) -> Vec<String> {
        let filters: Vec<Value> = self
            .filters
            .iter()
            .map(|(name, values)| serde_json::json!({ "Name": name, "Values": values }))
            .collect();
        let mut args: Vec<String> = ["ec2", "describe-instances", "--output", "json"]
            .map(String::from)
            .to_vec();
        if let Some(region) = &self.region {
            args.extend(["--region".into(), region.clone()]);
        }
        args.extend(["--filters".into(), Value::Array(filters).to_string()]);
        args
    }
}

/// Runs `aws ec2 describe-instances` and parses what it printed.
pub async fn find(config: &Ec2Config) -> Result<Vec<FoundHost>> {
    let failed =
        |message: String| Error::DiscoveryFailed(format!("{}: {message}", config.describe()));
    let child = tokio::process::Command::new("aws")
        .args(config.cli_args())
        // CLI v2 would page JSON through `less` on a terminal.
        .env("AWS_PAGER", "")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            failed(format!(
                "cannot run the aws CLI ({e}): install it (`pip install awscli`, or AWS CLI v2)"
            ))
        })?;
    let out = tokio::time::timeout(CALL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            failed(format!(
                "the aws CLI gave no answer within {CALL_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| failed(format!("the aws CLI failed: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!(
            "aws ec2 describe-instances failed ({}): {}",
            out.status,
            stderr.trim().escape_debug()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse(&text, config)
        .map_err(|message| Error::Discovery(format!("{}: {message}", config.describe())))
}

/// The running instances in DescribeInstances output, named and addressed as configured.
/// Every value is checked as a `[[hosts]]` entry would be, and a bad one names its instance.
pub fn parse(json: &str, config: &Ec2Config) -> std::result::Result<Vec<FoundHost>, String> {
    let doc: Value = serde_json::from_str(json)
        .map_err(|e| format!("DescribeInstances output is not JSON: {e}"))?;
    let mut found: Vec<(String, FoundHost)> = Vec::new();
    let reservations = doc["Reservations"]
        .as_array()
        .ok_or("DescribeInstances output has no Reservations list")?;
    for instance in reservations
        .iter()
        .filter_map(|r| r["Instances"].as_array())
        .flatten()
    {
        let Some(id) = instance["InstanceId"].as_str() else {
            return Err("an instance without an InstanceId".into());
        };
        let origin = format!("instance {}", id.escape_debug());
        if instance["State"]["Name"].as_str() != Some("running") {
            continue;
        }
        let name = instance["Tags"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["Key"].as_str() == Some(&config.name_tag))
            .and_then(|t| t["Value"].as_str())
            .filter(|v| !v.is_empty())
            .unwrap_or(id);
        let field = config.address.field();
        let Some(address) = instance[field].as_str().filter(|a| !a.is_empty()) else {
            return Err(format!(
                "{origin} ({name}) has no {} address ({field})",
                config.address.as_str()
            ));
        };
        let host = FoundHost {
            name: name.to_string(),
            address: address.to_string(),
        };
        if let Some(problem) = host.problem(&origin) {
            return Err(problem);
        }
        found.push((origin, host));
    }
    check_unique(&found)?;
    Ok(found.into_iter().map(|(_, h)| h).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(address: AddressKind) -> Ec2Config {
        Ec2Config {
            region: Some("eu-west-1".into()),
            filters: [("tag:Role".to_string(), vec!["shop".to_string()])].into(),
            address,
            name_tag: "Name".into(),
            user: None,
        }
    }

    fn instance(id: &str, state: &str, name: Option<&str>, ip: Option<&str>) -> Value {
        let mut i = serde_json::json!({
            "InstanceId": id,
            "State": { "Code": 16, "Name": state },
            "PrivateDnsName": format!("ip-{id}.eu-west-1.compute.internal"),
            "PublicDnsName": "",
            "Tags": [{ "Key": "Role", "Value": "shop" }],
        });
        if let Some(name) = name {
            i["Tags"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({ "Key": "Name", "Value": name }));
        }
        if let Some(ip) = ip {
            i["PrivateIpAddress"] = ip.into();
        }
        i
    }

    fn output(reservations: &[&[Value]]) -> String {
        let r: Vec<Value> = reservations
            .iter()
            .map(|instances| serde_json::json!({ "Instances": instances }))
            .collect();
        serde_json::json!({ "Reservations": r }).to_string()
    }

    fn names(found: &[FoundHost]) -> Vec<(&str, &str)> {
        found
            .iter()
            .map(|h| (h.name.as_str(), h.address.as_str()))
            .collect()
    }

    #[test]
    fn only_running_instances_across_reservations() {
        let json = output(&[
            &[
                instance("i-1", "running", Some("web-1"), Some("10.0.0.11")),
                instance("i-2", "stopped", Some("web-2"), Some("10.0.0.12")),
            ],
            &[
                instance("i-3", "running", Some("web-3"), Some("10.0.0.13")),
                instance("i-4", "pending", Some("web-4"), Some("10.0.0.14")),
                instance("i-5", "terminated", Some("web-5"), None),
            ],
        ]);
        let found = parse(&json, &config(AddressKind::PrivateIp)).unwrap();
        assert_eq!(
            names(&found),
            [("web-1", "10.0.0.11"), ("web-3", "10.0.0.13")]
        );
    }

    #[test]
    fn an_instance_without_the_name_tag_is_named_by_its_id() {
        let json = output(&[&[
            instance("i-0abc", "running", None, Some("10.0.0.11")),
            instance("i-0def", "running", Some(""), Some("10.0.0.12")),
        ]]);
        let found = parse(&json, &config(AddressKind::PrivateIp)).unwrap();
        assert_eq!(
            names(&found),
            [("i-0abc", "10.0.0.11"), ("i-0def", "10.0.0.12")]
        );
        let mut by_role = config(AddressKind::PrivateIp);
        by_role.name_tag = "Role".into();
        let err = parse(&json, &by_role).unwrap_err();
        assert!(err.contains("both have the name \"shop\""), "{err}");
    }

    #[test]
    fn the_configured_address_is_used() {
        let mut i = instance("i-1", "running", Some("web-1"), Some("10.0.0.11"));
        i["PublicIpAddress"] = "203.0.113.7".into();
        let json = output(&[&[i]]);
        let pick = |kind| {
            names(&parse(&json, &config(kind)).unwrap())[0]
                .1
                .to_string()
        };
        assert_eq!(pick(AddressKind::PrivateIp), "10.0.0.11");
        assert_eq!(pick(AddressKind::PublicIp), "203.0.113.7");
        assert_eq!(
            pick(AddressKind::PrivateDns),
            "ip-i-1.eu-west-1.compute.internal"
        );
    }

    #[test]
    fn a_missing_address_names_the_instance() {
        // EC2 reports an empty PublicDnsName for instances without a public address.
        let json = output(&[&[instance("i-1", "running", Some("web-1"), None)]]);
        let err = parse(&json, &config(AddressKind::PublicDns)).unwrap_err();
        assert_eq!(
            err,
            "instance i-1 (web-1) has no public-dns address (PublicDnsName)"
        );
        let err = parse(&json, &config(AddressKind::PrivateIp)).unwrap_err();
        assert!(
            err.starts_with("instance i-1 (web-1) has no private-ip"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_are_refused() {
        let json = output(&[&[
            instance("i-1", "running", Some("web-1"), Some("10.0.0.11")),
            instance("i-2", "running", Some("web-1"), Some("10.0.0.12")),
        ]]);
        let err = parse(&json, &config(AddressKind::PrivateIp)).unwrap_err();
        assert_eq!(
            err,
            "instance i-1 and instance i-2 both have the name \"web-1\": host names must be unique"
        );
    }

    #[test]
    fn untrusted_values_are_refused_naming_the_instance() {
        let json = output(&[&[instance(
            "i-1",
            "running",
            Some("web 1; rm -rf /"),
            Some("10.0.0.11"),
        )]]);
        let err = parse(&json, &config(AddressKind::PrivateIp)).unwrap_err();
        assert!(err.starts_with("instance i-1: host name"), "{err}");
        let json = output(&[&[instance(
            "i-1",
            "running",
            Some("web-1"),
            Some("10.0.0.1/8"),
        )]]);
        let err = parse(&json, &config(AddressKind::PrivateIp)).unwrap_err();
        assert!(
            err.starts_with("instance i-1: address \"10.0.0.1/8\""),
            "{err}"
        );
    }

    #[test]
    fn no_instances_is_an_empty_list_and_garbage_is_an_error() {
        let found = parse(r#"{"Reservations": []}"#, &config(AddressKind::PrivateIp)).unwrap();
        assert!(found.is_empty());
        assert!(parse("<html>", &config(AddressKind::PrivateIp)).is_err());
        assert!(parse("{}", &config(AddressKind::PrivateIp)).is_err());
    }

    #[test]
    fn filters_go_to_the_cli_as_json() {
        let mut c = config(AddressKind::PrivateIp);
        c.filters
            .insert("tag:Env".into(), vec!["prod".into(), "a,b".into()]);
        let args = c.cli_args();
        assert_eq!(
            args,
            [
                "ec2",
                "describe-instances",
                "--output",
                "json",
                "--region",
                "eu-west-1",
                "--filters",
                r#"[{"Name":"tag:Env","Values":["prod","a,b"]},{"Name":"tag:Role","Values":["shop"]}]"#,
            ]
        );
        assert_eq!(
            c.describe(),
            "EC2 instances in eu-west-1 with tag:Env=prod,a,b, tag:Role=shop"
        );
    }
}
