//! Servers going offline, told to the browsers watching their bucket. An agent that dies
//! sends nothing: its socket just ends, and without a word from km a page would show the
//! server online until reloaded while the API already says offline.

use km_core::app::App;
use km_ingest::session::Session;
use km_stores::LiveEvent;

/// The live event of a server whose last agent socket ended. Its payload is the server's
/// `{server_name, online: false, last_update, internal_ip, processes, server}`.
pub const SERVER_OFFLINE: &str = "server:offline";

/// Called when one of the server's agent sockets ended (after its last state was saved):
/// if that was its last socket, the server is offline by the API's rule (online while an
/// agent socket is held) and its bucket's watchers on every node hear it.
pub fn socket_ended(app: &App, session: &Session) {
    if session.online() || !app.bus.watched(&session.bucket_id) {
        return;
    }
    app.bus.publish_live(LiveEvent::new(
        &session.bucket_id,
        &session.server_name,
        SERVER_OFFLINE,
        &session.meta().to_string(),
    ));
}
