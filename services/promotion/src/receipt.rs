//! A receipt parsed and bounded at the boundary: decimals exact, sizes limited.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{Channel, check_tenant};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Longest receipt or refund id (they become parts of ledger idempotency keys).
pub const MAX_RECEIPT_ID_LEN: usize = 64;
/// Most lines on one receipt.
pub const MAX_LINES: usize = 500;
/// Most coupon and promo codes on one receipt.
pub const MAX_CODES: usize = 20;
const MAX_QUANTITY: i64 = 100_000;
const MAX_UNIT_PRICE: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Identification {
    None,
    Card(String),
    Member(String),
    Phone(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub line_id: String,
    pub sku: String,
    pub quantity: Decimal,
    pub unit_price: Decimal,
    pub sale_price: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub tenant_id: String,
    pub receipt_id: String,
    pub store_id: String,
    pub channel: Channel,
    pub terminal_id: String,
    pub cashier_id: String,
    pub identification: Identification,
    pub lines: Vec<Line>,
    pub codes: Vec<String>,
    pub points_to_redeem: i64,
    pub purchase_time: Option<Millis>,
}

/// A receipt line as it arrives, decimals still text.
#[derive(Debug, Clone, Default)]
pub struct RawLine {
    pub line_id: String,
    pub sku: String,
    pub quantity: String,
    pub unit_price: String,
    pub sale_price: bool,
}

pub use loyalty_platform::types::parse_decimal;

impl Receipt {
    /// Builds a receipt from its raw parts, reporting every problem at once.
    #[allow(clippy::too_many_arguments)]
    pub fn parse(
        tenant_id: String,
        receipt_id: String,
        store_id: String,
        channel: Channel,
        terminal_id: String,
        cashier_id: String,
        identification: Identification,
        raw_lines: Vec<RawLine>,
        codes: Vec<String>,
        points_to_redeem: i64,
        purchase_time: Option<Millis>,
    ) -> Result<Self> {
        let mut v = Violations::new();
        let p = "receipt";
        check_tenant(&mut v, &tenant_id);
        v.text(&receipt_id, format!("{p}.receipt_id"), MAX_RECEIPT_ID_LEN);
        v.text(&store_id, format!("{p}.store_id"), MAX_ID_LEN);
        v.optional_text(&terminal_id, format!("{p}.terminal_id"), MAX_ID_LEN);
        v.optional_text(&cashier_id, format!("{p}.cashier_id"), MAX_ID_LEN);
        match &identification {
            Identification::None => {}
            Identification::Card(c) => v.text(c, format!("{p}.card_number"), 32),
            Identification::Member(m) => v.text(m, format!("{p}.member_id"), MAX_ID_LEN),
            Identification::Phone(ph) => v.text(ph, format!("{p}.phone"), 32),
        }
        if raw_lines.is_empty() {
            v.add(format!("{p}.lines"), "a receipt needs at least one line");
        }
        if raw_lines.len() > MAX_LINES {
            v.add(
                format!("{p}.lines"),
                format!("at most {MAX_LINES} lines per receipt"),
            );
        }
        if codes.len() > MAX_CODES {
            v.add(
                format!("{p}.codes"),
                format!("at most {MAX_CODES} codes per receipt"),
            );
        }
        for (i, c) in codes.iter().enumerate().take(MAX_CODES) {
            v.text(c, format!("{p}.codes[{i}]"), 64);
        }
        v.check(
            points_to_redeem >= 0,
            format!("{p}.points_to_redeem"),
            "must not be negative",
        );
        v.check(
            points_to_redeem <= crate::MAX_POINTS,
            format!("{p}.points_to_redeem"),
            "is too large",
        );
        if points_to_redeem > 0 && identification == Identification::None {
            v.add(
                format!("{p}.points_to_redeem"),
                "paying with points needs an identified customer (card, member id or phone)",
            );
        }
        let mut lines = Vec::with_capacity(raw_lines.len().min(MAX_LINES));
        let mut seen = std::collections::HashSet::new();
        for (i, raw) in raw_lines.into_iter().enumerate().take(MAX_LINES) {
            let f = |name: &str| format!("{p}.lines[{i}].{name}");
            v.text(&raw.line_id, f("line_id"), 64);
            if !raw.line_id.is_empty() && !seen.insert(raw.line_id.clone()) {
                v.add(f("line_id"), format!("duplicate line id {:?}", raw.line_id));
            }
            v.text(&raw.sku, f("sku"), MAX_ID_LEN);
            let quantity = match parse_decimal(&raw.quantity, 3) {
                Ok(q) if q <= Decimal::ZERO => {
                    v.add(f("quantity"), "must be positive");
                    Decimal::ZERO
                }
                Ok(q) if q > Decimal::from(MAX_QUANTITY) => {
                    v.add(f("quantity"), format!("must be at most {MAX_QUANTITY}"));
                    Decimal::ZERO
                }
                Ok(q) => q,
                Err(why) => {
                    v.add(f("quantity"), why);
                    Decimal::ZERO
                }
            };
            let unit_price = match parse_decimal(&raw.unit_price, crate::program::MONEY_SCALE) {
                Ok(x) if x < Decimal::ZERO => {
                    v.add(f("unit_price"), "must not be negative");
                    Decimal::ZERO
                }
                Ok(x) if x > Decimal::from(MAX_UNIT_PRICE) => {
                    v.add(f("unit_price"), format!("must be at most {MAX_UNIT_PRICE}"));
                    Decimal::ZERO
                }
                Ok(x) => x,
                Err(why) => {
                    v.add(f("unit_price"), why);
                    Decimal::ZERO
                }
            };
            lines.push(Line {
                line_id: raw.line_id,
                sku: raw.sku,
                quantity,
                unit_price,
                sale_price: raw.sale_price,
            });
        }
        v.finish()?;
        Ok(Self {
            tenant_id,
            receipt_id,
            store_id,
            channel,
            terminal_id,
            cashier_id,
            identification,
            lines,
            codes,
            points_to_redeem,
            purchase_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_and_bounded() {
        assert_eq!(parse_decimal("12.50", 2).unwrap().to_string(), "12.50");
        assert_eq!(parse_decimal("0.350", 3).unwrap().to_string(), "0.350");
        assert!(parse_decimal("1.234", 2).is_err());
        assert!(parse_decimal("1e3", 2).is_err());
        assert!(parse_decimal("NaN", 2).is_err());
        assert!(parse_decimal("", 2).is_err());
    }
}
