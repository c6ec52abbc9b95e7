//! A bucket's fleet at a glance, as the dashboard and the notifier judge it: each app
//! across its servers (cluster instances together), each server's host, and what needs
//! someone first (servers offline, processes errored, apps restarting in a loop).

use std::collections::BTreeMap;

use serde_json::Value;

use crate::app::App;
use crate::fleet::{self, ServerStatus};
use km_stores::ids::now_ms;
use km_stores::{EventKind, EventQuery, Events, StoreResult};

/// Crashes of an app within [`LOOP_WINDOW_MS`] that make a restart loop.
pub const LOOP_CRASHES: usize = 3;
pub const LOOP_WINDOW_MS: i64 = 60_000;
/// Exits read to count crashes: a loop shows long before this many.
const CRASHES_READ: u32 = 1_000;

/// Crashes (exits pm2 was not asked for) of each app in the [`LOOP_WINDOW_MS`] before
/// `end`, by (server, app).
pub async fn crashes(
    events: &dyn Events,
    bucket_id: &str,
    end: i64,
) -> StoreResult<BTreeMap<(String, String), usize>> {
    let exits = EventQuery {
        bucket_id: bucket_id.to_string(),
        event_type: Some("exit".into()),
        after: Some(end - LOOP_WINDOW_MS - 1),
        before: Some(end),
        limit: CRASHES_READ,
        ..EventQuery::default()
    };
    let mut crashes = BTreeMap::new();
    for doc in events.query(EventKind::ProcessEvent, &exits).await? {
        let Ok(event) = serde_json::from_str::<Value>(&doc) else {
            continue;
        };
        if event["manually"].as_bool() == Some(true) {
            continue;
        }
        let field = |name: &str| event[name].as_str().unwrap_or_default().to_string();
        *crashes
            .entry((field("server_name"), field("app_name")))
            .or_default() += 1;
    }
    Ok(crashes)
}

/// The apps in a restart loop ([`LOOP_CRASHES`] crashes or more), by (server, app).
pub fn loops(
    crashes: BTreeMap<(String, String), usize>,
) -> impl Iterator<Item = ((String, String), usize)> {
    crashes.into_iter().filter(|(_, n)| *n >= LOOP_CRASHES)
}

/// `1 server`, `2 servers`: a count in words.
pub fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// An app (all processes of that name) across the bucket's servers.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AppHealth {
    pub name: String,
    /// The servers it runs on, by name.
    pub servers: Vec<String>,
    pub instances: usize,
    /// Instances online on an online server.
    pub online: usize,
    pub errored: usize,
    /// Sums over the instances online (CPU in %, memory in bytes).
    pub cpu: f64,
    pub memory: f64,
    pub restarts: i64,
    /// Something about it is in [`Fleet::problems`].
    pub troubled: bool,
}

/// A server and its host, as its agent last described them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostHealth {
    pub name: String,
    pub online: bool,
    pub last_update: i64,
    pub hostname: String,
    pub platform: String,
    pub pm2_version: String,
    pub node_version: String,
    /// Seconds since the host booted.
    pub uptime_s: f64,
    /// 1, 5 and 15 minutes, when the agent sent them.
    pub loadavg: Option<[f64; 3]>,
    /// Bytes (0: not sent).
    pub total_mem: f64,
    pub processes: usize,
    /// Sums over its processes (CPU in %, memory in bytes).
    pub cpu: f64,
    pub memory: f64,
}

/// Why a server or an app needs someone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    Offline,
    Errored,
    RestartLoop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub server: String,
    /// The app, unless the whole server is the problem.
    pub app: Option<String>,
    /// What is wrong, in words ("3 crashes in the last minute").
    pub detail: String,
    /// For an offline server: when it was last heard of (epoch ms).
    pub since: Option<i64>,
}

/// The bucket's apps and servers, problems first.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fleet {
    pub problems: Vec<Problem>,
    /// Troubled apps first, then by name.
    pub apps: Vec<AppHealth>,
    /// Offline servers first, then by name.
    pub hosts: Vec<HostHealth>,
}

impl Fleet {
    /// The fleet of the bucket now: its servers' statuses and its latest crashes.
    pub async fn load(app: &App, bucket_id: &str) -> StoreResult<Fleet> {
        let servers = fleet::servers(app, bucket_id, None).await;
        let crashes = crashes(app.events.as_ref(), bucket_id, now_ms()).await?;
        Ok(Fleet::of(&servers, crashes))
    }

    /// The fleet of these statuses with these crash counts by (server, app).
    pub fn of(servers: &[ServerStatus], crashes: BTreeMap<(String, String), usize>) -> Fleet {
        let mut problems = Vec::new();
        let mut apps: BTreeMap<&str, AppHealth> = BTreeMap::new();
        let mut hosts = Vec::new();
        for server in servers {
            let name = &server.server_name;
            if !server.online {
                problems.push(Problem {
                    kind: ProblemKind::Offline,
                    server: name.clone(),
                    app: None,
                    detail: "offline".into(),
                    since: Some(server.last_update),
                });
            }
            let mut host = host(server);
            for p in &server.data.process {
                let app = apps.entry(&p.name).or_insert_with(|| AppHealth {
                    name: p.name.clone(),
                    ..AppHealth::default()
                });
                if !app.servers.contains(name) {
                    app.servers.push(name.clone());
                }
                app.instances += 1;
                app.restarts += p.restart_time;
                app.troubled |= !server.online;
                if !server.online {
                    continue;
                }
                match p.status.as_str() {
                    "online" => {
                        app.online += 1;
                        app.cpu += p.cpu;
                        app.memory += p.memory;
                        host.cpu += p.cpu;
                        host.memory += p.memory;
                    }
                    "errored" => {
                        app.errored += 1;
                        app.troubled = true;
                        problems.push(Problem {
                            kind: ProblemKind::Errored,
                            server: name.clone(),
                            app: Some(p.name.clone()),
                            detail: format!("pm_id {} errored: pm2 stopped restarting it", p.pm_id),
                            since: None,
                        });
                    }
                    _ => {}
                }
            }
            hosts.push(host);
        }
        for ((server, app), n) in loops(crashes) {
            if let Some(health) = apps.get_mut(app.as_str()) {
                health.troubled = true;
            }
            problems.push(Problem {
                kind: ProblemKind::RestartLoop,
                server,
                app: Some(app),
                detail: format!("restart loop: {n} crashes in the last minute"),
                since: None,
            });
        }
        problems.sort_by(|a, b| (a.kind, &a.server, &a.app).cmp(&(b.kind, &b.server, &b.app)));
        let mut apps: Vec<AppHealth> = apps.into_values().collect();
        apps.sort_by(|a, b| (!a.troubled, &a.name).cmp(&(!b.troubled, &b.name)));
        hosts.sort_by(|a, b| (a.online, &a.name).cmp(&(b.online, &b.name)));
        Fleet {
            problems,
            apps,
            hosts,
        }
    }

    /// Processes in all.
    pub fn processes(&self) -> usize {
        self.hosts.iter().map(|h| h.processes).sum()
    }

    pub fn online_hosts(&self) -> usize {
        self.hosts.iter().filter(|h| h.online).count()
    }
}

/// A server's host; its process sums are added by the caller.
fn host(server: &ServerStatus) -> HostHealth {
    let host = &server.data.server;
    HostHealth {
        name: server.server_name.clone(),
        online: server.online,
        last_update: server.last_update,
        hostname: host.hostname.clone(),
        platform: host.platform.clone(),
        pm2_version: host.pm2_version.clone(),
        node_version: host.node_version.clone(),
        uptime_s: host.uptime,
        loadavg: match host.loadavg[..] {
            [one, five, fifteen, ..] => Some([one, five, fifteen]),
            _ => None,
        },
        total_mem: host.total_mem,
        processes: server.data.process.len(),
        cpu: 0.0,
        memory: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn server(name: &str, online: bool, processes: Value) -> ServerStatus {
        serde_json::from_value(json!({
            "server_name": name, "online": online, "last_update": 1000,
            "data": {"server": {"hostname": name, "loadavg": [0.5, 0.25, 0.125], "total_mem": 8e9,
                                "uptime": 3600, "platform": "linux"},
                     "process": processes}
        }))
        .unwrap()
    }

    fn process(name: &str, pm_id: i64, status: &str, cpu: f64, memory: f64) -> Value {
        json!({"name": name, "pm_id": pm_id, "status": status, "cpu": cpu, "memory": memory,
               "restart_time": 2})
    }

    #[test]
    fn apps_are_summed_across_servers_and_problems_come_first() {
        let servers = [
            server(
                "a",
                true,
                json!([
                    process("api", 0, "online", 10.0, 100.0),
                    process("api", 1, "online", 5.0, 50.0),
                    process("worker", 2, "errored", 0.0, 0.0),
                ]),
            ),
            server("b", true, json!([process("api", 0, "online", 1.0, 10.0)])),
            server("c", false, json!([process("cron", 0, "online", 1.0, 1.0)])),
        ];
        let crashes = BTreeMap::from([
            (("b".to_string(), "api".to_string()), LOOP_CRASHES),
            (("a".to_string(), "api".to_string()), LOOP_CRASHES - 1),
        ]);
        let fleet = Fleet::of(&servers, crashes);

        let kinds: Vec<_> = fleet
            .problems
            .iter()
            .map(|p| (p.kind, &*p.server))
            .collect();
        assert_eq!(
            kinds,
            [
                (ProblemKind::Offline, "c"),
                (ProblemKind::Errored, "a"),
                (ProblemKind::RestartLoop, "b")
            ]
        );
        let names: Vec<_> = fleet.apps.iter().map(|a| &*a.name).collect();
        assert_eq!(names, ["api", "cron", "worker"], "all three are troubled");
        let api = &fleet.apps[0];
        assert_eq!((api.instances, api.online, api.errored), (3, 3, 0));
        assert_eq!((api.cpu, api.memory, api.restarts), (16.0, 160.0, 6));
        assert_eq!(api.servers, ["a", "b"]);
        let cron = &fleet.apps[1];
        assert_eq!(
            (cron.online, cron.cpu),
            (0, 0.0),
            "an offline server's processes are not counted online"
        );

        let hosts: Vec<_> = fleet.hosts.iter().map(|h| (&*h.name, h.online)).collect();
        assert_eq!(hosts, [("c", false), ("a", true), ("b", true)]);
        let a = &fleet.hosts[1];
        assert_eq!((a.processes, a.cpu, a.memory), (3, 15.0, 150.0));
        assert_eq!(a.loadavg, Some([0.5, 0.25, 0.125]));
        assert_eq!((fleet.processes(), fleet.online_hosts()), (5, 2));
    }

    #[test]
    fn a_host_without_load_or_memory_shows_none() {
        let status: ServerStatus = serde_json::from_value(json!({
            "server_name": "x", "online": true,
            "data": {"server": {"loadavg": "high", "total_mem": "lots"}, "process": []}
        }))
        .unwrap();
        let fleet = Fleet::of(&[status], BTreeMap::new());
        assert_eq!(fleet.hosts[0].loadavg, None);
        assert_eq!(fleet.hosts[0].total_mem, 0.0);
    }
}
