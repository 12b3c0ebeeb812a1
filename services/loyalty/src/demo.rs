//! `--demo`: a sample tenant so a newcomer sees real answers at once. Loading is skipped
//! when the tenant already has a program (restarts keep what was there).

use anyhow::Context;
use loyalty_balance::ledger::{Op, Reason};
use loyalty_identity::domain::{CardKind, Registration};
use loyalty_platform::clock::{DAY_MS, SharedClock};
use loyalty_platform::types::Channel;
use loyalty_promotion::catalog::{Product, Store};
use loyalty_promotion::program::Program;

use crate::wiring::Node;

pub const TENANT: &str = "demo";
/// (phone, first name, card number, opening points in minor units)
pub const MEMBERS: &[(&str, &str, &str, i64)] = &[
    ("+77010000001", "Aigerim", "1000000001", 50_000),
    ("+77010000002", "Daniyar", "1000000002", 0),
    ("+77010000003", "Saule", "1000000003", 12_500),
];

fn store(id: &str, name: &str, brand: &str, region: &str) -> Store {
    Store {
        store_id: id.into(),
        name: name.into(),
        brand: brand.into(),
        region: region.into(),
        time_zone: "Asia/Almaty".into(),
    }
}

fn product(sku: &str, name: &str, category: &str, brand: &str) -> Product {
    Product {
        sku: sku.into(),
        name: name.into(),
        category: category.into(),
        brand: brand.into(),
    }
}

/// Loads the sample tenant; returns false when it was already there.
pub async fn load(node: &Node, clock: &SharedClock) -> anyhow::Result<bool> {
    let (Some(admin), Some(identity), Some(balance)) = (&node.admin, &node.identity, &node.balance)
    else {
        anyhow::bail!("--demo needs the identity, balance and promotion services in this process");
    };
    if admin.program(TENANT).await.is_ok() {
        return Ok(false);
    }
    admin
        .upsert_stores(
            TENANT,
            &[
                store("almaty-1", "ShoeHub Dostyk Plaza", "ShoeHub", "Almaty"),
                store("astana-1", "ShoeHub Keruen", "ShoeHub", "Astana"),
                store("almaty-kids", "KidsStep Mega", "KidsStep", "Almaty"),
            ],
        )
        .await
        .context("demo stores")?;
    admin
        .upsert_products(
            TENANT,
            &[
                product("boots-42", "Winter boots, size 42", "Boots", "Tundra"),
                product("sneakers-run", "Running sneakers", "Sneakers", "Stride"),
                product("socks-3pack", "Socks, 3 pairs", "Accessories", "Stride"),
                product("kids-sandals", "Kids sandals", "Kids", "Sunny"),
                product("insoles", "Warm insoles", "Accessories", "Tundra"),
            ],
        )
        .await
        .context("demo products")?;
    for (phone, name, card, opening) in MEMBERS {
        let member = identity
            .register(Registration {
                tenant_id: TENANT.into(),
                phone: (*phone).into(),
                channel: Channel::Store,
                store_id: "almaty-1".into(),
                first_name: (*name).into(),
                ..Default::default()
            })
            .await
            .context("demo member")?;
        identity
            .issue_card(TENANT, &member.member_id, CardKind::Plastic, card)
            .await
            .context("demo card")?;
        if *opening > 0 {
            let op = Op::Accrue {
                amount: *opening,
                reason: Reason::OpeningBalance,
                reference: "demo".into(),
                activate_at: None,
                expire_at: Some(clock.now_ms() + 180 * DAY_MS),
            };
            balance
                .execute(
                    TENANT,
                    &member.member_id,
                    &format!("demo:opening:{card}"),
                    op,
                )
                .await
                .context("demo opening balance")?;
        }
    }
    // The program goes last: its presence marks the demo as loaded.
    admin
        .update_program(Program::case_study(TENANT, "KZT"), 0)
        .await
        .context("demo program")?;
    Ok(true)
}
