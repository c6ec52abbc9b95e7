//! The roles of km: what `km serve --role ROLE` runs, and where.

use std::net::SocketAddr;

use km_config::{Settings, table};

/// A part of km that can run on its own: `km serve --role ROLE` (one systemd unit each
/// in the appliance). Roles apart share state only through the stores and the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// The front door: `KM_LISTEN` (and HTTPS), forwarding each path to its role.
    Gateway,
    /// HTTP API, `verifyPM2` and the dashboard (`KM_API_LISTEN`).
    Api,
    /// Accounts and tokens, `/api/oauth` (`KM_AUTH_LISTEN`).
    Auth,
    /// Browsers' websocket `/primus` (`KM_REALTIME_LISTEN`).
    Realtime,
    /// Agents' websocket `/interaction`: ingest and commands (`KM_INTERACTOR_LISTEN`).
    Interactor,
    /// Background jobs (notifications, retention); a port for `/healthz` and `/metrics`
    /// only (`KM_WORKERS_LISTEN`).
    Workers,
}

impl Role {
    /// Its name in `--role`, in `/healthz` and in the gateway's checks.
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Api => "api",
            Role::Auth => "auth",
            Role::Realtime => "realtime",
            Role::Interactor => "interactor",
            Role::Workers => "workers",
        }
    }

    /// Its own port's address and variable, for every role but the gateway.
    pub fn address(self, settings: &Settings) -> Option<(SocketAddr, &'static str)> {
        let roles = &settings.roles;
        match self {
            Role::Api => Some((roles.api, table::API_LISTEN.var)),
            Role::Auth => Some((roles.auth, table::AUTH_LISTEN.var)),
            Role::Realtime => Some((roles.realtime, table::REALTIME_LISTEN.var)),
            Role::Interactor => Some((roles.interactor, table::INTERACTOR_LISTEN.var)),
            Role::Workers => Some((roles.workers, table::WORKERS_LISTEN.var)),
            Role::Gateway => None,
        }
    }
}
