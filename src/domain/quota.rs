//! A tenant's own limits, set by the operator (`confab tenant set-limits`).

use serde::Serialize;

use super::Patch;

/// Limits of one tenant; `None` means "the server's default" (flags / environment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TenantLimits {
    /// REST requests per minute.
    pub requests_per_minute: Option<u32>,
    /// WebSocket messages per second per connection.
    pub ws_messages_per_second: Option<u32>,
    /// Open WebSocket connections.
    pub max_connections: Option<u32>,
}

/// A change to a tenant's limits, field by field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantLimitsPatch {
    pub requests_per_minute: Patch<u32>,
    pub ws_messages_per_second: Patch<u32>,
    pub max_connections: Patch<u32>,
}

impl TenantLimits {
    pub fn apply(&mut self, p: TenantLimitsPatch) {
        p.requests_per_minute.apply(&mut self.requests_per_minute);
        p.ws_messages_per_second
            .apply(&mut self.ws_messages_per_second);
        p.max_connections.apply(&mut self.max_connections);
    }
}
