//! The inventory a fleet writes for roller: the same file an operator writes for production,
//! pointing at the fleet's hosts, key, known_hosts and nginx.

use std::path::Path;

use crate::fleet::{
    APP_DIR, Fleet, HEALTH_PATH, JAR_NAME, KEEP_OLD, RESTART, RESTART_SLOT, SLOTS, STOP_SLOT,
};
use crate::nginx;

impl Fleet {
    pub(crate) fn inventory_text(&self) -> String {
        let s = &self.state;
        let q = |v: &str| toml::Value::String(v.to_string()).to_string();
        let p = |v: &Path| q(&v.to_string_lossy());
        let nginx = self.nginx();
        let blue_green = s.spec.mode.is_blue_green();
        // A top-level key must come before the first table, or TOML puts it in that table.
        let strategy = if blue_green {
            "strategy = \"blue-green\"\n\n"
        } else {
            ""
        };
        let restart = if blue_green {
            format!("{RESTART_SLOT} {}", SLOTS[0])
        } else {
            RESTART.to_string()
        };
        let mut text = format!(
            "# Local fleet written by `cargo xtask fleet up`: real sshd per host, nginx on the LB host.\n\
             {strategy}\
             [ssh]\n\
             user = {user}\n\
             port = {ssh_port}\n\
             identity = {identity}\n\
             known_hosts = {known_hosts}\n\
             connect_timeout = \"5s\"\n\
             {proxy_jump}\
             \n\
             [app]\n\
             name = {name}\n\
             dir = {dir}              # relative to the login directory: each local host's sshd starts sessions in its own directory\n\
             jar_name = {jar_name}\n\
             restart = {restart}\n\
             port = {app_port}\n\
             keep_releases = 5\n\
             {app_sudo}\
             \n\
             [health]\n\
             path = {health}\n\
             expect_status = 200\n\
             interval = \"100ms\"\n\
             timeout = \"20s\"\n\
             successes = 1\n\
             \n\
             [balancer]\n\
             hosts = [{lb}]\n\
             upstream_file = {upstream_file}\n\
             upstream = {upstream}\n\
             test = {test}\n\
             reload = {reload}\n\
             pid_file = {pid_file}\n\
             drain_timeout = \"10s\"\n\
             {lb_sudo}",
            user = q(&s.user),
            // Deploy users with sudo reach root's files only through it.
            app_sudo = if !s.spec.app_logins.is_empty()
                && s.hosts.iter().all(|h| h.login.is_some())
                && s.spec.app_logins.iter().all(|l| l.has_sudo())
            {
                "sudo = true\n"
            } else {
                ""
            },
            lb_sudo = match s.spec.lb_login {
                Some(login) if login.has_sudo() && s.user == login.user() => "sudo = true\n",
                _ => "",
            },
            ssh_port = s.spec.ssh_port,
            // Hosts that admit only the bastion are reached through it, as in a private subnet.
            proxy_jump = match (s.spec.bastion, s.bastion.as_ref()) {
                (crate::Bastion::Only, Some(bastion)) => format!(
                    "proxy_jump = {}\n",
                    q(&format!(
                        "{}@{}:{}",
                        s.user, bastion.address, s.spec.ssh_port
                    ))
                ),
                _ => String::new(),
            },
            identity = p(&self.identity_path()),
            known_hosts = p(&self.known_hosts_path()),
            name = q(nginx::UPSTREAM),
            dir = q(APP_DIR),
            jar_name = q(JAR_NAME),
            restart = q(&restart),
            app_port = s.spec.app_port,
            health = q(HEALTH_PATH),
            lb = q(&s.lb.address),
            upstream_file = p(&nginx.upstream_file()),
            upstream = q(nginx::UPSTREAM),
            test = q(&nginx.test_command()),
            reload = q(&nginx.reload_command()),
            pid_file = p(&nginx.pid_file()),
        );
        if blue_green {
            // app.port and app.restart above stay for tools that only know rolling fleets;
            // they name the blue slot, which is what `up` starts.
            text.push_str(&format!(
                "\n[blue_green]\n\
                 blue_port = {blue}\n\
                 green_port = {green}\n\
                 restart = {restart}   # {{slot}} is blue or green; {{port}} its port\n\
                 stop = {stop}\n\
                 keep_old = {keep_old}                      # how long old slots keep running for an instant `roller switch-back`\n",
                blue = s.spec.app_port,
                green = s.spec.green_port,
                restart = q(&format!("{RESTART_SLOT} {{slot}}")),
                stop = q(&format!("{STOP_SLOT} {{slot}}")),
                keep_old = q(KEEP_OLD),
            ));
        }
        for host in &s.hosts {
            text.push_str(&format!(
                "\n[[hosts]]\nname = {}\naddress = {}\n",
                q(&host.name),
                q(&host.address)
            ));
            if let Some(login) = &host.login {
                text.push_str(&format!("user = {}\n", q(&login.user)));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use crate::fleet::fake;
    use crate::{FleetSpec, Mode};

    #[test]
    fn rolling_inventory_is_unchanged() {
        let fleet = fake(FleetSpec::new("/f", 2, [77, 0]));
        let expected = "\
# Local fleet written by `cargo xtask fleet up`: real sshd per host, nginx on the LB host.
[ssh]
user = \"dev\"
port = 2222
identity = \"/f/keys/id_ed25519\"
known_hosts = \"/f/known_hosts\"
connect_timeout = \"5s\"

[app]
name = \"shop\"
dir = \"shop\"              # relative to the login directory: each local host's sshd starts sessions in its own directory
jar_name = \"app.jar\"
restart = \"bin/restart\"
port = 8080
keep_releases = 5

[health]
path = \"/actuator/health\"
expect_status = 200
interval = \"100ms\"
timeout = \"20s\"
successes = 1

[balancer]
hosts = [\"127.77.0.10\"]
upstream_file = \"/f/lb/nginx/conf.d/shop-upstream.conf\"
upstream = \"shop\"
test = \"/usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -t -q\"
reload = \"/usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -t -q && /usr/sbin/nginx -p /f/lb/nginx -c nginx.conf -s reload\"
pid_file = \"/f/lb/nginx/nginx.pid\"
drain_timeout = \"10s\"

[[hosts]]
name = \"web-1\"
address = \"127.77.0.11\"

[[hosts]]
name = \"web-2\"
address = \"127.77.0.12\"
";
        assert_eq!(fleet.inventory_text(), expected);
    }

    #[test]
    fn blue_green_inventory_adds_strategy_and_slots() {
        let fleet = fake(FleetSpec::new("/f", 2, [77, 0]).with_mode(Mode::BlueGreen));
        let text = fleet.inventory_text();
        let rolling = fake(FleetSpec::new("/f", 2, [77, 0])).inventory_text();
        let first_key = text.lines().find(|l| !l.starts_with('#') && !l.is_empty());
        assert_eq!(first_key, Some("strategy = \"blue-green\""), "{text}");
        assert!(
            text.contains(
                "\n[blue_green]\n\
                 blue_port = 8081\n\
                 green_port = 8082\n\
                 restart = \"bin/restart-slot {slot}\"   # {slot} is blue or green; {port} its port\n\
                 stop = \"bin/stop-slot {slot}\"\n\
                 keep_old = \"10m\""
            ),
            "{text}"
        );

        let parsed: toml::Table = text.parse().expect("valid TOML");
        let rolling: toml::Table = rolling.parse().unwrap();
        let mut keys: Vec<&String> = parsed.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "app",
                "balancer",
                "blue_green",
                "health",
                "hosts",
                "ssh",
                "strategy"
            ]
        );
        assert_eq!(parsed["strategy"].as_str(), Some("blue-green"));
        let bg = parsed["blue_green"].as_table().unwrap();
        assert_eq!(bg["blue_port"].as_integer(), Some(8081));
        assert_eq!(bg["green_port"].as_integer(), Some(8082));
        assert_eq!(bg["keep_old"].as_str(), Some("10m"));
        assert_eq!(parsed["app"]["port"].as_integer(), Some(8081));
        assert_eq!(
            parsed["app"]["restart"].as_str(),
            Some("bin/restart-slot blue")
        );
        // Every other key is the rolling fleet's, with the same value.
        for section in ["ssh", "app", "health", "balancer"] {
            let (bg, rolling) = (parsed[section].as_table(), rolling[section].as_table());
            let (bg, rolling) = (bg.unwrap(), rolling.unwrap());
            assert_eq!(
                bg.keys().collect::<Vec<_>>(),
                rolling.keys().collect::<Vec<_>>()
            );
            for (key, value) in rolling {
                if !(section == "app" && (key == "port" || key == "restart")) {
                    assert_eq!(&bg[key], value, "{section}.{key}");
                }
            }
        }
        assert_eq!(parsed["hosts"], rolling["hosts"]);
    }

    #[test]
    fn single_machine_inventory_puts_the_app_on_the_lb() {
        let spec = FleetSpec::new("/f", 3, [77, 0]).with_mode(Mode::BlueGreenSingle);
        assert_eq!(spec.hosts, 1);
        let fleet = fake(spec);
        let parsed: toml::Table = fleet.inventory_text().parse().unwrap();
        assert_eq!(parsed["strategy"].as_str(), Some("blue-green"));
        let hosts = parsed["hosts"].as_array().unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["name"].as_str(), Some("app"));
        assert_eq!(hosts[0]["address"].as_str(), Some("127.77.0.10"));
        assert_eq!(
            parsed["balancer"]["hosts"].as_array().unwrap(),
            &[toml::Value::from("127.77.0.10")]
        );
        assert_eq!(fleet.host_dir("app"), fleet.host_dir("lb"));
    }

    #[test]
    fn hosts_that_admit_only_the_bastion_are_reached_through_it() {
        let only = fake(FleetSpec::new("/f", 2, [77, 0]).with_bastion(crate::Bastion::Only));
        assert!(
            only.inventory_text()
                .contains("connect_timeout = \"5s\"\nproxy_jump = \"dev@127.77.0.9:2222\"\n"),
            "{}",
            only.inventory_text()
        );
        let open = fake(FleetSpec::new("/f", 2, [77, 0]).with_bastion(crate::Bastion::Open));
        assert!(!open.inventory_text().contains("proxy_jump"));
    }
}
