//! Small domain types more than one service speaks.

use serde::{Deserialize, Serialize};

use crate::error::{MAX_TENANT_ID_LEN, Result, Violations};

/// Where a call or a purchase comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Channel {
    #[default]
    Unspecified,
    Store,
    Online,
    App,
    CallCenter,
    Admin,
}

/// Checks a tenant id: required, short, printable.
pub fn check_tenant(v: &mut Violations, tenant_id: &str) {
    v.text(tenant_id, "tenant_id", MAX_TENANT_ID_LEN);
}

/// Validates a lone tenant id.
pub fn tenant(tenant_id: &str) -> Result<()> {
    let mut v = Violations::new();
    check_tenant(&mut v, tenant_id);
    v.finish()
}
