//! Small domain types more than one service speaks.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::error::{MAX_TENANT_ID_LEN, Result, Violations};

/// Where a call or a purchase comes from.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
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

/// Parses an exact decimal, refusing floats' friends (exponents, NaN) and excess precision.
pub fn parse_decimal(text: &str, max_scale: u32) -> std::result::Result<Decimal, String> {
    if text.is_empty() {
        return Err("is required".into());
    }
    if text.len() > 32
        || !text
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
    {
        return Err(format!("{text:?} is not a decimal number like \"12.50\""));
    }
    let d: Decimal = text
        .parse()
        .map_err(|_| format!("{text:?} is not a decimal number like \"12.50\""))?;
    if d.normalize().scale() > max_scale {
        return Err(format!("has more than {max_scale} fraction digits"));
    }
    Ok(d)
}
