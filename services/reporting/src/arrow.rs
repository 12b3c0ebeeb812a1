//! Fact rows as Apache Arrow record batches: what Arrow IPC exports, Arrow Flight and the
//! Parquet files carry. The columns are the CSV export's (`export`), typed: days as
//! `Date32`, times as UTC milliseconds, money and quantities as `Decimal128(38, 4)`, lists as
//! lists. No personal data.

use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, Int32Builder, Int64Builder, ListBuilder,
    StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use loyalty_platform::error::{Error, Result};
use rust_decimal::Decimal;

use crate::exporter::{Kind, Rows};
use crate::fact::Fact;
use crate::rollup::{MONEY_SCALE, channel_name, units};

const DECIMAL: DataType = DataType::Decimal128(38, MONEY_SCALE as i8);

fn time() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
}

fn field(name: &str, t: DataType, nullable: bool) -> Field {
    Field::new(name, t, nullable)
}

static PURCHASES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        field("receipt_id", DataType::Utf8, false),
        field("business_day", DataType::Date32, false),
        field("purchase_time", time(), false),
        field("store_id", DataType::Utf8, false),
        field("store_brand", DataType::Utf8, false),
        field("store_region", DataType::Utf8, false),
        field("channel", DataType::Utf8, false),
        field("member_id", DataType::Utf8, true),
        field("gross", DECIMAL, false),
        field("discount", DECIMAL, false),
        field("paid", DECIMAL, false),
        field("points_accrued", DataType::Int64, false),
        field("points_redeemed", DataType::Int64, false),
        field("codes", list(), false),
        field("campaign_ids", list(), false),
        field("held_out_campaign_ids", list(), false),
    ]))
});

static LINES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        field("receipt_id", DataType::Utf8, false),
        field("line", DataType::Int32, false),
        field("business_day", DataType::Date32, false),
        field("store_id", DataType::Utf8, false),
        field("member_id", DataType::Utf8, true),
        field("sku", DataType::Utf8, false),
        field("category", DataType::Utf8, false),
        field("brand", DataType::Utf8, false),
        field("quantity", DECIMAL, false),
        field("paid", DECIMAL, false),
        field("sale_price", DataType::Boolean, false),
    ]))
});

static REFUNDS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        field("receipt_id", DataType::Utf8, false),
        field("refund_id", DataType::Utf8, false),
        field("business_day", DataType::Date32, false),
        field("refund_time", time(), false),
        field("store_id", DataType::Utf8, false),
        field("member_id", DataType::Utf8, true),
        field("refunded", DECIMAL, false),
        field("fully_refunded", DataType::Boolean, false),
        field("points_reversed", DataType::Int64, false),
        field("points_returned", DataType::Int64, false),
    ]))
});

static LEDGER: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        field("member_id", DataType::Utf8, false),
        field("sequence", DataType::Int64, false),
        field("reason", DataType::Utf8, false),
        field("amount", DataType::Int64, false),
        field("balance_after", DataType::Int64, false),
        field("create_time", time(), false),
    ]))
});

static MEMBERS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        field("member_id", DataType::Utf8, false),
        field("active", DataType::Boolean, false),
        field("registered_at", time(), true),
        field("registration_store_id", DataType::Utf8, true),
        field("registration_channel", DataType::Utf8, true),
        field("contactable", DataType::Boolean, false),
        field("questionnaire_complete", DataType::Boolean, false),
        field("referred", DataType::Boolean, false),
        field("first_purchase_day", DataType::Date32, true),
        field("last_purchase_day", DataType::Date32, true),
        field("receipts", DataType::Int64, false),
        field("spend", DECIMAL, false),
    ]))
});

pub fn schema(kind: Kind) -> SchemaRef {
    match kind {
        Kind::Purchases => PURCHASES.clone(),
        Kind::Lines => LINES.clone(),
        Kind::Refunds => REFUNDS.clone(),
        Kind::Ledger => LEDGER.clone(),
        Kind::Members => MEMBERS.clone(),
    }
}

fn decimals() -> Decimal128Builder {
    Decimal128Builder::new().with_data_type(DECIMAL)
}

fn dec(b: &mut Decimal128Builder, d: Decimal) {
    b.append_value(i128::from(units(d)));
}

fn day(d: i64) -> i32 {
    i32::try_from(d).unwrap_or(if d < 0 { i32::MIN } else { i32::MAX })
}

fn times() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

fn strings(b: &mut ListBuilder<StringBuilder>, values: &[String]) {
    for v in values {
        b.values().append_value(v);
    }
    b.append(true);
}

fn finish(kind: Kind, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(schema(kind), columns).map_err(Error::internal)
}

/// One page of rows as a record batch of the kind's schema.
pub fn batch(kind: Kind, rows: &Rows) -> Result<RecordBatch> {
    match (kind, rows) {
        (Kind::Members, Rows::Members(m)) => members(m),
        (Kind::Purchases, Rows::Facts(f)) => purchases(f),
        (Kind::Lines, Rows::Facts(f)) => lines(f),
        (Kind::Refunds, Rows::Facts(f)) => refunds(f),
        (Kind::Ledger, Rows::Facts(f)) => ledger(f),
        _ => Err(Error::internal(anyhow::anyhow!(
            "rows of another kind than {kind:?}"
        ))),
    }
}

fn purchases(facts: &[Fact]) -> Result<RecordBatch> {
    let (mut receipt, mut bday, mut at) = (StringBuilder::new(), Date32Builder::new(), times());
    let (mut store, mut brand, mut region, mut channel, mut member) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut gross, mut discount, mut paid) = (decimals(), decimals(), decimals());
    let (mut accrued, mut redeemed) = (Int64Builder::new(), Int64Builder::new());
    let mut codes = ListBuilder::new(StringBuilder::new());
    let mut campaigns = ListBuilder::new(StringBuilder::new());
    let mut held_out = ListBuilder::new(StringBuilder::new());
    for f in facts {
        let Fact::Purchase(p) = f else { continue };
        receipt.append_value(&p.receipt_id);
        bday.append_value(day(p.day));
        at.append_value(p.time);
        store.append_value(&p.outlet.store_id);
        brand.append_value(&p.outlet.brand);
        region.append_value(&p.outlet.region);
        channel.append_value(channel_name(p.channel));
        member.append_option(p.member_id.as_deref());
        dec(&mut gross, p.gross);
        dec(&mut discount, p.discount);
        dec(&mut paid, p.paid);
        accrued.append_value(p.points_accrued);
        redeemed.append_value(p.points_redeemed);
        strings(&mut codes, &p.codes);
        strings(&mut campaigns, &p.campaign_ids);
        strings(&mut held_out, &p.held_out_campaign_ids);
    }
    finish(
        Kind::Purchases,
        vec![
            Arc::new(receipt.finish()),
            Arc::new(bday.finish()),
            Arc::new(at.finish()),
            Arc::new(store.finish()),
            Arc::new(brand.finish()),
            Arc::new(region.finish()),
            Arc::new(channel.finish()),
            Arc::new(member.finish()),
            Arc::new(gross.finish()),
            Arc::new(discount.finish()),
            Arc::new(paid.finish()),
            Arc::new(accrued.finish()),
            Arc::new(redeemed.finish()),
            Arc::new(codes.finish()),
            Arc::new(campaigns.finish()),
            Arc::new(held_out.finish()),
        ],
    )
}

fn lines(facts: &[Fact]) -> Result<RecordBatch> {
    let (mut receipt, mut line, mut bday) = (
        StringBuilder::new(),
        Int32Builder::new(),
        Date32Builder::new(),
    );
    let (mut store, mut member, mut sku, mut category, mut brand) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut quantity, mut paid, mut sale) = (decimals(), decimals(), BooleanBuilder::new());
    for f in facts {
        let Fact::Purchase(p) = f else { continue };
        for (i, l) in p.lines.iter().enumerate() {
            receipt.append_value(&p.receipt_id);
            line.append_value(i32::try_from(i + 1).unwrap_or(i32::MAX));
            bday.append_value(day(p.day));
            store.append_value(&p.outlet.store_id);
            member.append_option(p.member_id.as_deref());
            sku.append_value(&l.sku);
            category.append_value(&l.category);
            brand.append_value(&l.brand);
            dec(&mut quantity, l.quantity);
            dec(&mut paid, l.paid);
            sale.append_value(l.sale_price);
        }
    }
    finish(
        Kind::Lines,
        vec![
            Arc::new(receipt.finish()),
            Arc::new(line.finish()),
            Arc::new(bday.finish()),
            Arc::new(store.finish()),
            Arc::new(member.finish()),
            Arc::new(sku.finish()),
            Arc::new(category.finish()),
            Arc::new(brand.finish()),
            Arc::new(quantity.finish()),
            Arc::new(paid.finish()),
            Arc::new(sale.finish()),
        ],
    )
}

fn refunds(facts: &[Fact]) -> Result<RecordBatch> {
    let (mut receipt, mut refund, mut bday, mut at) = (
        StringBuilder::new(),
        StringBuilder::new(),
        Date32Builder::new(),
        times(),
    );
    let (mut store, mut member) = (StringBuilder::new(), StringBuilder::new());
    let (mut refunded, mut full) = (decimals(), BooleanBuilder::new());
    let (mut reversed, mut returned) = (Int64Builder::new(), Int64Builder::new());
    for f in facts {
        let Fact::Refund(r) = f else { continue };
        receipt.append_value(&r.receipt_id);
        refund.append_value(&r.refund_id);
        bday.append_value(day(r.day));
        at.append_value(r.time);
        store.append_value(&r.outlet.store_id);
        member.append_option(r.member_id.as_deref());
        dec(&mut refunded, r.refunded);
        full.append_value(r.fully_refunded);
        reversed.append_value(r.points_reversed);
        returned.append_value(r.points_returned);
    }
    finish(
        Kind::Refunds,
        vec![
            Arc::new(receipt.finish()),
            Arc::new(refund.finish()),
            Arc::new(bday.finish()),
            Arc::new(at.finish()),
            Arc::new(store.finish()),
            Arc::new(member.finish()),
            Arc::new(refunded.finish()),
            Arc::new(full.finish()),
            Arc::new(reversed.finish()),
            Arc::new(returned.finish()),
        ],
    )
}

fn ledger(facts: &[Fact]) -> Result<RecordBatch> {
    let (mut member, mut seq, mut reason) = (
        StringBuilder::new(),
        Int64Builder::new(),
        StringBuilder::new(),
    );
    let (mut amount, mut after, mut at) = (Int64Builder::new(), Int64Builder::new(), times());
    for f in facts {
        let Fact::Ledger(l) = f else { continue };
        member.append_value(&l.member_id);
        seq.append_value(l.seq);
        reason.append_value(l.reason.name());
        amount.append_value(l.amount);
        after.append_value(l.balance_after);
        at.append_value(l.time);
    }
    finish(
        Kind::Ledger,
        vec![
            Arc::new(member.finish()),
            Arc::new(seq.finish()),
            Arc::new(reason.finish()),
            Arc::new(amount.finish()),
            Arc::new(after.finish()),
            Arc::new(at.finish()),
        ],
    )
}

fn members(rows: &[crate::service::MemberFeatures]) -> Result<RecordBatch> {
    let (mut id, mut active, mut registered) =
        (StringBuilder::new(), BooleanBuilder::new(), times());
    let (mut store, mut channel) = (StringBuilder::new(), StringBuilder::new());
    let (mut contactable, mut questionnaire, mut referred) = (
        BooleanBuilder::new(),
        BooleanBuilder::new(),
        BooleanBuilder::new(),
    );
    let (mut first, mut last) = (Date32Builder::new(), Date32Builder::new());
    let (mut receipts, mut spend) = (Int64Builder::new(), decimals());
    for m in rows {
        let p = m.profile.as_ref();
        id.append_value(&m.member_id);
        active.append_value(p.is_none_or(|p| p.active));
        registered.append_option(p.and_then(|p| p.registered_at));
        store.append_option(p.map(|p| p.store_id.as_str()));
        channel.append_option(p.map(|p| channel_name(p.channel)));
        contactable.append_value(p.is_some_and(|p| p.contactable));
        questionnaire.append_value(p.is_some_and(|p| p.questionnaire_complete));
        referred.append_value(p.is_some_and(|p| p.referred));
        first.append_option(m.first_purchase.map(day));
        last.append_option(m.last_purchase.map(day));
        receipts.append_value(m.receipts);
        dec(&mut spend, m.spend);
    }
    finish(
        Kind::Members,
        vec![
            Arc::new(id.finish()),
            Arc::new(active.finish()),
            Arc::new(registered.finish()),
            Arc::new(store.finish()),
            Arc::new(channel.finish()),
            Arc::new(contactable.finish()),
            Arc::new(questionnaire.finish()),
            Arc::new(referred.finish()),
            Arc::new(first.finish()),
            Arc::new(last.finish()),
            Arc::new(receipts.finish()),
            Arc::new(spend.finish()),
        ],
    )
}
