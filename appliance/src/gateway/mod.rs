//! The gateway role: the front door. [`front`] holds its routes (ACME answers, the
//! wizard, and forwarding to the other roles through [`proxy`] when they run apart);
//! [`redirect`] the plain port's rules when HTTPS is on. The TLS itself is `km_tls`.

pub mod front;
pub mod proxy;
mod redirect;

pub use front::Front;
pub use redirect::{HttpsBase, Route, redirecting, route};
