//! The appliance's settings: the table every setting is declared in, their checked form,
//! the env file that holds them and the licence. Below every other crate of km but the
//! stores; no network.

pub mod envfile;
pub mod licence;
mod settings;
pub mod table;

pub use settings::{
    BackupSchedule, ConfigErrors, RoleAddresses, Settings, SmtpSettings, SmtpTls, TlsMode, Values,
    looks_like_email,
};
pub use table::{Group, Kind, Secret, Setting};
