//! What every role of km shares, below HTTP and the workers: the state of one process
//! (`app`), a bucket's own settings (`bucket_settings`), the fleet as the roles see it
//! (`fleet`: statuses merged across nodes and the stored records, commands to agents),
//! the fleet at a glance (`health`: apps across servers, hosts, problems first),
//! exceptions grouped into issues (`issues`), invitations to a bucket (`invitations`),
//! the licence's process limit (`limits`),
//! jobs once per period across nodes (`schedule`), the SMTP transport (`mail`) and the
//! sign-in throttle (`throttle`).

pub mod app;
pub mod bucket_settings;
pub mod fleet;
pub mod health;
pub mod invitations;
pub mod issues;
pub mod limits;
pub mod mail;
pub mod schedule;
pub mod throttle;
