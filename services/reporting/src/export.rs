//! Fact rows as CSV, one header row per export. Columns carry no personal data: member ids
//! are opaque, and there is no phone, name, email or birthday anywhere.

use std::fmt::Write;

use loyalty_platform::clock::Millis;

use crate::exporter::{Kind, Rows};
use crate::fact::{Fact, Purchase, Refund};
use crate::kpi::date_label;
use crate::rollup::channel_name;
use crate::service::MemberFeatures;

pub const PURCHASE_COLUMNS: &[&str] = &[
    "receipt_id",
    "business_day",
    "purchase_time",
    "store_id",
    "store_brand",
    "store_region",
    "channel",
    "member_id",
    "gross",
    "discount",
    "paid",
    "points_accrued",
    "points_redeemed",
    "codes",
    "campaign_ids",
    "held_out_campaign_ids",
];

pub const LINE_COLUMNS: &[&str] = &[
    "receipt_id",
    "line",
    "business_day",
    "store_id",
    "member_id",
    "sku",
    "category",
    "brand",
    "quantity",
    "paid",
    "sale_price",
];

pub const REFUND_COLUMNS: &[&str] = &[
    "receipt_id",
    "refund_id",
    "business_day",
    "refund_time",
    "store_id",
    "member_id",
    "refunded",
    "fully_refunded",
    "points_reversed",
    "points_returned",
];

pub const LEDGER_COLUMNS: &[&str] = &[
    "member_id",
    "sequence",
    "reason",
    "amount",
    "balance_after",
    "create_time",
];

pub const MEMBER_COLUMNS: &[&str] = &[
    "member_id",
    "active",
    "registered_at",
    "registration_store_id",
    "registration_channel",
    "contactable",
    "questionnaire_complete",
    "referred",
    "first_purchase_day",
    "last_purchase_day",
    "receipts",
    "spend",
];

/// A field, quoted when it holds a separator, a quote or a line break.
fn field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn row(out: &mut String, fields: &[&str]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        field(out, f);
    }
    out.push('\n');
}

pub fn header(out: &mut String, columns: &[&str]) {
    row(out, columns);
}

pub fn time(at: Millis) -> String {
    jiff::Timestamp::from_millisecond(at)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub fn purchase(out: &mut String, p: &Purchase) {
    row(
        out,
        &[
            &p.receipt_id,
            &date_label(p.day),
            &time(p.time),
            &p.outlet.store_id,
            &p.outlet.brand,
            &p.outlet.region,
            channel_name(p.channel),
            p.member_id.as_deref().unwrap_or(""),
            &p.gross.to_string(),
            &p.discount.to_string(),
            &p.paid.to_string(),
            &p.points_accrued.to_string(),
            &p.points_redeemed.to_string(),
            &p.codes.join(" "),
            &p.campaign_ids.join(" "),
            &p.held_out_campaign_ids.join(" "),
        ],
    );
}

/// Every line of the purchase; returns how many rows were written.
pub fn lines(out: &mut String, p: &Purchase) -> usize {
    let day = date_label(p.day);
    let member = p.member_id.as_deref().unwrap_or("");
    let mut n = String::new();
    for (i, l) in p.lines.iter().enumerate() {
        n.clear();
        let _ = write!(n, "{}", i + 1);
        row(
            out,
            &[
                &p.receipt_id,
                &n,
                &day,
                &p.outlet.store_id,
                member,
                &l.sku,
                &l.category,
                &l.brand,
                &l.quantity.to_string(),
                &l.paid.to_string(),
                if l.sale_price { "true" } else { "false" },
            ],
        );
    }
    p.lines.len()
}

pub fn refund(out: &mut String, r: &Refund) {
    row(
        out,
        &[
            &r.receipt_id,
            &r.refund_id,
            &date_label(r.day),
            &time(r.time),
            &r.outlet.store_id,
            r.member_id.as_deref().unwrap_or(""),
            &r.refunded.to_string(),
            if r.fully_refunded { "true" } else { "false" },
            &r.points_reversed.to_string(),
            &r.points_returned.to_string(),
        ],
    );
}

/// A fact's rows of the given columns; returns how many.
pub fn fact(out: &mut String, f: &Fact, as_lines: bool) -> usize {
    match (f, as_lines) {
        (Fact::Purchase(p), true) => lines(out, p),
        (Fact::Purchase(p), false) => {
            purchase(out, p);
            1
        }
        (Fact::Refund(r), _) => {
            refund(out, r);
            1
        }
        (Fact::Ledger(l), _) => {
            row(
                out,
                &[
                    &l.member_id,
                    &l.seq.to_string(),
                    l.reason.name(),
                    &l.amount.to_string(),
                    &l.balance_after.to_string(),
                    &time(l.time),
                ],
            );
            1
        }
        (Fact::Member(_), _) => 0,
    }
}

/// A page of rows as CSV, with the header row first when asked.
pub fn chunk(out: &mut String, kind: Kind, rows: &Rows, with_header: bool) {
    if with_header {
        header(
            out,
            match kind {
                Kind::Purchases => PURCHASE_COLUMNS,
                Kind::Lines => LINE_COLUMNS,
                Kind::Refunds => REFUND_COLUMNS,
                Kind::Ledger => LEDGER_COLUMNS,
                Kind::Members => MEMBER_COLUMNS,
            },
        );
    }
    match rows {
        Rows::Facts(facts) => {
            for f in facts {
                fact(out, f, kind == Kind::Lines);
            }
        }
        Rows::Members(members) => {
            for m in members {
                member(out, m);
            }
        }
    }
}

pub fn member(out: &mut String, m: &MemberFeatures) {
    let p = m.profile.clone().unwrap_or_default();
    let yes = |b: bool| if b { "true" } else { "false" };
    let day = |d: Option<i64>| d.map(date_label).unwrap_or_default();
    row(
        out,
        &[
            &m.member_id,
            yes(m.profile.is_none() || p.active),
            &p.registered_at.map(time).unwrap_or_default(),
            &p.store_id,
            if m.profile.is_some() {
                channel_name(p.channel)
            } else {
                ""
            },
            yes(p.contactable),
            yes(p.questionnaire_complete),
            yes(p.referred),
            &day(m.first_purchase),
            &day(m.last_purchase),
            &m.receipts.to_string(),
            &m.spend.to_string(),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_with_separators_are_quoted() {
        let mut out = String::new();
        row(&mut out, &["a", "b,c", "say \"hi\"", "line\nbreak"]);
        assert_eq!(out, "a,\"b,c\",\"say \"\"hi\"\"\",\"line\nbreak\"\n");
    }
}
