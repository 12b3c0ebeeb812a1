//! The promotion store on the embedded database.

use std::path::Path;

use loyalty_platform::embedded::{EmbeddedDb, decode, encode, key, prefix_range};
use loyalty_platform::error::{Error, Result};
use redb::{ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CheckoutContext, PromotionStore};
use crate::catalog::{Product, Store};
use crate::program::Program;
use crate::purchase::Purchase;

const PROGRAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("programs");
const STORES: TableDefinition<&str, &[u8]> = TableDefinition::new("stores");
const PRODUCTS: TableDefinition<&str, &[u8]> = TableDefinition::new("products");
const PURCHASES: TableDefinition<&str, &[u8]> = TableDefinition::new("purchases");

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
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        k: String,
    ) -> Result<Option<T>> {
        self.db
            .read(move |txn| {
                let Ok(t) = txn.open_table(table) else {
                    return Ok(None);
                };
                t.get(k.as_str())
                    .map_err(e)?
                    .map(|v| decode(v.value()))
                    .transpose()
            })
            .await
    }

    async fn upsert<T: Serialize + Clone + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        items: Vec<(String, T)>,
    ) -> Result<()> {
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(table).map_err(e)?;
                for (k, item) in &items {
                    t.insert(k.as_str(), encode(item)?.as_slice()).map_err(e)?;
                }
                Ok(())
            })
            .await
    }

    async fn list<T: DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
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
                let Ok(t) = txn.open_table(table) else {
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

fn e(err: impl Into<anyhow::Error>) -> Error {
    Error::internal(err)
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
                let current: Option<Program> = t.get(k.as_str()).map_err(e)?.map(|v| decode(v.value())).transpose()?;
                let current_version = current.map_or(0, |p| p.version);
                if expected_version != 0 && expected_version != current_version {
                    return Err(Error::FailedPrecondition(format!(
                        "program is at version {current_version}, not {expected_version}: read it again"
                    )));
                }
                let mut saved = program.clone();
                saved.version = current_version + 1;
                t.insert(k.as_str(), encode(&saved)?.as_slice()).map_err(e)?;
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
                let mut ctx = CheckoutContext::default();
                if let Ok(t) = txn.open_table(PROGRAMS) {
                    ctx.program = t
                        .get(program_key.as_str())
                        .map_err(e)?
                        .map(|v| decode(v.value()))
                        .transpose()?;
                }
                if let Ok(t) = txn.open_table(STORES) {
                    ctx.store = t
                        .get(store_key.as_str())
                        .map_err(e)?
                        .map(|v| decode(v.value()))
                        .transpose()?;
                }
                match txn.open_table(PRODUCTS) {
                    Ok(t) => {
                        for k in &product_keys {
                            ctx.products.push(
                                t.get(k.as_str())
                                    .map_err(e)?
                                    .map(|v| decode(v.value()))
                                    .transpose()?,
                            );
                        }
                    }
                    Err(_) => ctx.products = vec![None; product_keys.len()],
                }
                Ok(ctx)
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
                let current: Option<Purchase> = t
                    .get(k.as_str())
                    .map_err(e)?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                if current.map(|p| p.version) != expected_version {
                    return Ok(false);
                }
                t.insert(k.as_str(), encode(&purchase)?.as_slice())
                    .map_err(e)?;
                Ok(true)
            })
            .await
    }

    async fn delete_purchase(
        &self,
        tenant_id: &str,
        receipt_id: &str,
        version: u64,
    ) -> Result<bool> {
        let k = key(&[tenant_id, receipt_id]);
        self.db
            .write(move |txn| {
                let mut t = txn.open_table(PURCHASES).map_err(e)?;
                let current: Option<Purchase> = t
                    .get(k.as_str())
                    .map_err(e)?
                    .map(|v| decode(v.value()))
                    .transpose()?;
                if current.map(|p| p.version) != Some(version) {
                    return Ok(false);
                }
                t.remove(k.as_str()).map_err(e)?;
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
