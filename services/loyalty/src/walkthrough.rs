//! `loyalty walkthrough`: drives the POS flow against a running server over gRPC, printing
//! each step. Needs no tool besides this binary; expects the demo tenant (`dev --demo`).

use anyhow::Context;
use loyalty_proto::balance::v1 as bpb;
use loyalty_proto::common::v1::Decimal;
use loyalty_proto::identity::v1 as ipb;
use loyalty_proto::promotion::v1 as ppb;
use rand::Rng;
use tonic::transport::Channel;

fn dec(s: &str) -> Option<Decimal> {
    Some(Decimal { value: s.into() })
}

fn points(minor: i64) -> String {
    format!("{}.{:02}", minor / 100, (minor % 100).abs())
}

#[allow(clippy::print_stdout)]
pub async fn run(addr: &str, tenant: &str) -> anyhow::Result<()> {
    let channel = Channel::from_shared(addr.to_string())
        .context("--addr must be a URL such as http://127.0.0.1:50051")?
        .connect()
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    let mut members = ipb::member_service_client::MemberServiceClient::new(channel.clone());
    let mut cards = ipb::card_service_client::CardServiceClient::new(channel.clone());
    let mut checkout = ppb::checkout_service_client::CheckoutServiceClient::new(channel.clone());
    let mut balance = bpb::balance_service_client::BalanceServiceClient::new(channel);

    let phone = format!("8 701 {:07}", rand::rng().random_range(0..10_000_000));
    let member = members
        .register_member(ipb::RegisterMemberRequest {
            tenant_id: tenant.into(),
            phone: phone.clone(),
            store_id: "almaty-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .member
        .context("no member in reply")?;
    println!(
        "1. registered {phone:?} as member {} (phone {})",
        member.member_id, member.phone
    );

    let card = cards
        .issue_card(ipb::IssueCardRequest {
            tenant_id: tenant.into(),
            member_id: member.member_id.clone(),
            kind: ipb::CardKind::Virtual as i32,
            number: String::new(),
        })
        .await?
        .into_inner()
        .card
        .context("no card in reply")?;
    println!("2. issued virtual card {}", card.number);

    let found = members
        .lookup_member(ipb::LookupMemberRequest {
            tenant_id: tenant.into(),
            key: Some(ipb::lookup_member_request::Key::CardNumber(
                card.number.clone(),
            )),
            default_region: String::new(),
        })
        .await?
        .into_inner();
    println!(
        "3. card {} belongs to member {}",
        card.number,
        found.member.map(|m| m.member_id).unwrap_or_default()
    );

    let receipt_id = format!("walkthrough-{}", member.member_id);
    let receipt = ppb::Receipt {
        tenant_id: tenant.into(),
        receipt_id: receipt_id.clone(),
        store_id: "almaty-1".into(),
        identification: Some(ppb::receipt::Identification::CardNumber(
            card.number.clone(),
        )),
        lines: vec![
            ppb::ReceiptLine {
                line_id: "1".into(),
                sku: "boots-42".into(),
                quantity: dec("1"),
                unit_price: dec("34990.00"),
                sale_price: false,
            },
            ppb::ReceiptLine {
                line_id: "2".into(),
                sku: "socks-3pack".into(),
                quantity: dec("2"),
                unit_price: dec("1990.00"),
                sale_price: true,
            },
        ],
        ..Default::default()
    };
    let quote = checkout
        .quote(ppb::QuoteRequest {
            receipt: Some(receipt.clone()),
            ..Default::default()
        })
        .await?
        .into_inner()
        .evaluation
        .context("no evaluation")?;
    println!(
        "4. quote: total {}, points to accrue {} (socks are on sale: {})",
        quote.net_amount.map(|d| d.value).unwrap_or_default(),
        points(quote.points_accrued),
        quote
            .lines
            .get(1)
            .map(|l| l.notes.join("; "))
            .unwrap_or_default()
    );

    let committed = checkout
        .commit(ppb::CommitRequest {
            receipt: Some(receipt.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "5. committed receipt {receipt_id}: balance now {} points",
        points(committed.points_balance)
    );
    let again = checkout
        .commit(ppb::CommitRequest {
            receipt: Some(receipt),
            ..Default::default()
        })
        .await?
        .into_inner();
    println!(
        "6. retried the same commit: same answer, balance still {} points",
        points(again.points_balance)
    );

    let refund = checkout
        .refund(ppb::RefundRequest {
            tenant_id: tenant.into(),
            receipt_id: receipt_id.clone(),
            refund_id: "r1".into(),
            lines: vec![ppb::RefundLine {
                line_id: "1".into(),
                quantity: dec("1"),
            }],
        })
        .await?
        .into_inner();
    println!(
        "7. refunded the boots: {} back to the customer, {} points reversed",
        refund.refunded_amount.map(|d| d.value).unwrap_or_default(),
        points(refund.points_reversed)
    );

    let b = balance
        .get_balance(bpb::GetBalanceRequest {
            tenant_id: tenant.into(),
            member_id: member.member_id.clone(),
        })
        .await?
        .into_inner()
        .balance
        .context("no balance")?;
    println!(
        "8. balance: {} active, {} pending, ledger at entry {}",
        points(b.active),
        points(b.pending),
        b.ledger_sequence
    );
    Ok(())
}
