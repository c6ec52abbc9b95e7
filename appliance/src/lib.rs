//! The KM appliance: a PM2 Plus compatible monitoring backend. Every role (api, auth,
//! interactor, realtime, workers) lives here; `km serve` runs them all in one process.

pub mod api;
pub mod auth;
pub mod error;
pub mod gateway;
pub mod interactor;
pub mod logging;
pub mod metrics;
pub mod realtime;
pub mod role;
pub mod routes;
pub mod server;
pub mod support;
pub mod web;
