//! The promotion store on the embedded database.

use std::path::Path;

use loyalty_platform::embedded::{
    EmbeddedDb, Records, decode, get_record, key, open_for_read, prefix_range, put_record,
    read_record, storage_error as e,
};
use loyalty_platform::error::{Error, Result};
use redb::TableDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CheckoutContext, PromotionStore};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;

const PROGRAMS: Records = TableDefinition::new("programs");
const STORES: Records = TableDefinition::new("stores");
const PRODUCTS: Records = TableDefinition::new("products");
const PURCHASES: Records = TableDefinition::new("purchases");

#[derive(Debug, Clone)]
pub struct EmbeddedPromotionStore {
    db: EmbeddedDb,
}

impl EmbeddedPromotionStore {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            db: EmbeddedDb::open(path)?,
        })
    }

    async fn get<T: DeserializeOwned + Send + 'static>(
        &self,
        table: Records,
        k: String,
    ) -> Result<Option<T>> {
        self.db.read(move |txn| read_record(txn, table, &k)).await
    }

    async fn upsert<T: Serialize + Clone + Send + 'static>(
        &self,
        table: Records,
        items: Vec<(String, T)>,
    ) -> Result<()> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(table).map_err(e)?;
                for (k, item) in &items {
                    put_record(&mut t, k, item)?;
                }
                Ok(())
            })
            .await
    }

    async fn list<T: DeserializeOwned + Send + 'static>(
        &self,
        table: Records,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<T>> {
        let (start, end) = prefix_range(&[tenant_id]);
        let after = if after.is_empty() {
            None
        } else {
            Some(key(&[tenant_id, after]))
        };
        self.db
            .read(move |txn| {
                let Some(t) = open_for_read(txn, table)? else {
                    return Ok(Vec::new());
                };
                let mut out = Vec::new();
                for item in t.range(start.as_str()..end.as_str()).map_err(e)? {
                    let (k, v) = item.map_err(e)?;
                    if after.as_deref().is_some_and(|a| k.value() <= a) {
                        continue;
                    }
                    out.push(decode(v.value())?);
                    if out.len() == limit {
                        break;
                    }
                }
                Ok(out)
            })
            .await
    }
}

#[async_trait::async_trait]
impl PromotionStore for EmbeddedPromotionStore {
    async fn program(&self, tenant_id: &str) -> Result<Option<Program>> {
        self.get(PROGRAMS, key(&[tenant_id])).await
    }

    async fn update_program(&self, program: Program, expected_version: i64) -> Result<Program> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(PROGRAMS).map_err(e)?;
                let k = key(&[&program.tenant_id]);
                let current: Option<Program> = get_record(&t, &k)?;
                let current_version = current.map_or(0, |p| p.version);
                if expected_version != 0 && expected_version != current_version {
                    return Err(Error::FailedPrecondition(format!(
                        "program is at version {current_version}, not {expected_version}: read it again"
                    )));
                }
                let mut saved = program.clone();
                saved.version = current_version + 1;
                put_record(&mut t, &k, &saved)?;
                Ok(saved)
            })
            .await
    }

    async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<()> {
        let items = stores
            .iter()
            .map(|s| (key(&[tenant_id, &s.store_id]), s.clone()))
            .collect();
        self.upsert(STORES, items).await
    }

    async fn list_stores(&self, tenant_id: &str, after: &str, limit: usize) -> Result<Vec<Store>> {
        self.list(STORES, tenant_id, after, limit).await
    }

    async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<()> {
        let items = products
            .iter()
            .map(|p| (key(&[tenant_id, &p.sku]), p.clone()))
            .collect();
        self.upsert(PRODUCTS, items).await
    }

    async fn list_products(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Product>> {
        self.list(PRODUCTS, tenant_id, after, limit).await
    }

    async fn checkout_context(
        &self,
        tenant_id: &str,
        store_id: &str,
        skus: &[String],
    ) -> Result<CheckoutContext> {
        let program_key = key(&[tenant_id]);
        let store_key = key(&[tenant_id, store_id]);
        let product_keys: Vec<String> = skus.iter().map(|s| key(&[tenant_id, s])).collect();
        self.db
            .read(move |txn| {
                let products = match open_for_read(txn, PRODUCTS)? {
                    Some(t) => product_keys
                        .iter()
                        .map(|k| get_record(&t, k))
                        .collect::<Result<Vec<_>>>()?,
                    None => vec![None; product_keys.len()],
                };
                Ok(CheckoutContext {
                    program: read_record(txn, PROGRAMS, &program_key)?,
                    store: read_record(txn, STORES, &store_key)?,
                    products,
                })
            })
            .await
    }

    async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Option<Purchase>> {
        self.get(PURCHASES, key(&[tenant_id, receipt_id])).await
    }

    async fn put_purchase(
        &self,
        purchase: &Purchase,
        expected_version: Option<u64>,
    ) -> Result<bool> {
        let purchase = purchase.clone();
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(PURCHASES).map_err(e)?;
                let k = key(&[&purchase.receipt.tenant_id, &purchase.receipt.receipt_id]);
                let current: Option<Purchase> = get_record(&t, &k)?;
                if current.map(|p| p.version) != expected_version {
                    return Ok(false);
                }
                put_record(&mut t, &k, &purchase)?;
                Ok(true)
            })
            .await
    }

    async fn ping(&self) -> Result<()> {
        self.db.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedPromotionStore::open(&dir.path().join("promotion.redb")).unwrap();
        super::super::conformance::run_all(&store).await;
    }
}
