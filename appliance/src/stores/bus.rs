//! The bus carries commands to whichever node holds an agent's socket. In one process
//! that is a direct call into the interactor's sessions.

use std::sync::Arc;

use async_trait::async_trait;

use super::StoreResult;

/// A frame for the agent linked as `server_name` in `bucket_id`.
#[derive(Debug, Clone)]
pub struct AgentCommand {
    pub bucket_id: String,
    pub server_name: String,
    /// The whole `{"channel":…,"payload":…}` text frame.
    pub frame: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    NotConnected,
}

/// What holds agent sockets and can hand them a command.
pub trait CommandSink: Send + Sync {
    fn deliver(&self, command: &AgentCommand) -> Delivery;
}

#[async_trait]
pub trait Bus: Send + Sync {
    async fn send_command(&self, command: AgentCommand) -> StoreResult<Delivery>;
}

/// The in-process bus: every agent socket is in this process.
pub struct LocalBus {
    sink: Arc<dyn CommandSink>,
}

impl LocalBus {
    pub fn new(sink: Arc<dyn CommandSink>) -> Self {
        LocalBus { sink }
    }
}

#[async_trait]
impl Bus for LocalBus {
    async fn send_command(&self, command: AgentCommand) -> StoreResult<Delivery> {
        Ok(self.sink.deliver(&command))
    }
}
