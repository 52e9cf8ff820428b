//! What the audit log records: which action, taken by whom.

use uuid::Uuid;

/// Something the audit log records. Stored (and filtered) by its dotted name,
/// `family.verb`, so a filter can name one action or a whole family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    TenantCreate,
    TenantUpdate,
    TenantDisable,
    TenantEnable,
    TenantDelete,
    KeyCreate,
    KeyRevoke,
    /// A tenant key's `expires_at` passed (recorded once, by the server's sweep).
    KeyExpire,
    AdminKeyCreate,
    AdminKeyRevoke,
    AdminKeyExpire,
    /// Requests or sockets refused for their credentials, counted per source and reason
    /// over a window (one row per window, however many requests).
    AuthFail,
    /// Replies refused by a token budget, counted per tenant, user and budget over a window.
    BudgetRefuse,
}

impl AuditAction {
    pub const ALL: [AuditAction; 13] = [
        AuditAction::TenantCreate,
        AuditAction::TenantUpdate,
        AuditAction::TenantDisable,
        AuditAction::TenantEnable,
        AuditAction::TenantDelete,
        AuditAction::KeyCreate,
        AuditAction::KeyRevoke,
        AuditAction::KeyExpire,
        AuditAction::AdminKeyCreate,
        AuditAction::AdminKeyRevoke,
        AuditAction::AdminKeyExpire,
        AuditAction::AuthFail,
        AuditAction::BudgetRefuse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::TenantCreate => "tenant.create",
            AuditAction::TenantUpdate => "tenant.update",
            AuditAction::TenantDisable => "tenant.disable",
            AuditAction::TenantEnable => "tenant.enable",
            AuditAction::TenantDelete => "tenant.delete",
            AuditAction::KeyCreate => "key.create",
            AuditAction::KeyRevoke => "key.revoke",
            AuditAction::KeyExpire => "key.expire",
            AuditAction::AdminKeyCreate => "admin_key.create",
            AuditAction::AdminKeyRevoke => "admin_key.revoke",
            AuditAction::AdminKeyExpire => "admin_key.expire",
            AuditAction::AuthFail => "auth.fail",
            AuditAction::BudgetRefuse => "budget.refuse",
        }
    }

    fn family(self) -> &'static str {
        let s = self.as_str();
        &s[..s.find('.').unwrap_or(s.len())]
    }

    /// The actions a filter names: one action (`tenant.disable`) or a family (`tenant`:
    /// every `tenant.*`); else why not, listing every action.
    pub fn matching(filter: &str) -> Result<Vec<AuditAction>, String> {
        let found: Vec<AuditAction> = AuditAction::ALL
            .into_iter()
            .filter(|a| a.as_str() == filter || a.family() == filter)
            .collect();
        if found.is_empty() {
            return Err(format!(
                "{filter:?} is no audited action or family; one of: {}",
                AuditAction::names().join(", ")
            ));
        }
        Ok(found)
    }

    /// Every action's name, for error messages and documentation.
    pub fn names() -> Vec<&'static str> {
        AuditAction::ALL.iter().map(|a| a.as_str()).collect()
    }
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who took an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The command line, with the operating-system user that ran it when known.
    Cli { user: Option<String> },
    /// A request to `/admin/v1` with this admin key.
    AdminKey(Uuid),
    /// The server itself: a bootstrap key, an expiry it noticed, a budget it enforced.
    Server,
    /// A client known only by its address (a failed authentication).
    Client { address: String },
}

impl Actor {
    /// The command line's actor: `$SUDO_USER` (who ran `sudo confab …`), else `$USER`.
    pub fn cli() -> Actor {
        let user = ["SUDO_USER", "USER", "LOGNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
        Actor::Cli { user }
    }

    /// The stored kind: `cli`, `admin_key`, `server` or `client`.
    pub fn kind(&self) -> &'static str {
        match self {
            Actor::Cli { .. } => "cli",
            Actor::AdminKey(_) => "admin_key",
            Actor::Server => "server",
            Actor::Client { .. } => "client",
        }
    }

    /// Which one of its kind: the OS user, the admin key's id, the client's address.
    pub fn id(&self) -> Option<String> {
        match self {
            Actor::Cli { user } => user.clone(),
            Actor::AdminKey(id) => Some(id.to_string()),
            Actor::Server => None,
            Actor::Client { address } => Some(address.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_name_an_action_or_a_family() {
        assert_eq!(
            AuditAction::matching("tenant.disable"),
            Ok(vec![AuditAction::TenantDisable])
        );
        assert_eq!(
            AuditAction::matching("admin_key"),
            Ok(vec![
                AuditAction::AdminKeyCreate,
                AuditAction::AdminKeyRevoke,
                AuditAction::AdminKeyExpire
            ])
        );
        assert_eq!(AuditAction::matching("key").map(|v| v.len()), Ok(3));
        for bad in ["tenant.", "tenants", "", "TENANT"] {
            let e = AuditAction::matching(bad).unwrap_err();
            assert!(e.contains("budget.refuse"), "{e}");
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names = AuditAction::names();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), AuditAction::ALL.len());
    }
}
