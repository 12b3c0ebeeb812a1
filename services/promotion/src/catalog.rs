//! Stores and products the rules and receipts refer to.

use loyalty_platform::error::{MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::check_tenant;
use serde::{Deserialize, Serialize};

/// Most stores or products in one upsert.
pub const MAX_UPSERT: usize = 1000;
const MAX_NAME_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    pub store_id: String,
    pub name: String,
    pub brand: String,
    pub region: String,
    pub time_zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub category: String,
    pub brand: String,
}

pub fn validate_stores(tenant_id: &str, stores: &[Store]) -> Result<()> {
    let mut v = Violations::new();
    check_tenant(&mut v, tenant_id);
    v.check(!stores.is_empty(), "stores", "must not be empty");
    v.check(
        stores.len() <= MAX_UPSERT,
        "stores",
        format!("at most {MAX_UPSERT} per call"),
    );
    for (i, s) in stores.iter().enumerate().take(MAX_UPSERT) {
        v.text(&s.store_id, format!("stores[{i}].store_id"), MAX_ID_LEN);
        v.optional_text(&s.name, format!("stores[{i}].name"), MAX_NAME_LEN);
        v.optional_text(&s.brand, format!("stores[{i}].brand"), MAX_NAME_LEN);
        v.optional_text(&s.region, format!("stores[{i}].region"), MAX_NAME_LEN);
        v.optional_text(&s.time_zone, format!("stores[{i}].time_zone"), 64);
    }
    v.finish()
}

pub fn validate_products(tenant_id: &str, products: &[Product]) -> Result<()> {
    let mut v = Violations::new();
    check_tenant(&mut v, tenant_id);
    v.check(!products.is_empty(), "products", "must not be empty");
    v.check(
        products.len() <= MAX_UPSERT,
        "products",
        format!("at most {MAX_UPSERT} per call"),
    );
    for (i, p) in products.iter().enumerate().take(MAX_UPSERT) {
        v.text(&p.sku, format!("products[{i}].sku"), MAX_ID_LEN);
        v.optional_text(&p.name, format!("products[{i}].name"), MAX_NAME_LEN);
        v.optional_text(&p.category, format!("products[{i}].category"), MAX_NAME_LEN);
        v.optional_text(&p.brand, format!("products[{i}].brand"), MAX_NAME_LEN);
    }
    v.finish()
}
