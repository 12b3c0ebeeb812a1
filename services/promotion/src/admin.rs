//! Program rules and catalog management.

use std::sync::Arc;

use loyalty_platform::clock::SharedClock;
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{check_tenant, tenant};

use crate::catalog::{Product, Store, validate_products, validate_stores};
use crate::ports::Segments;
use crate::program::Program;
use crate::store::PromotionStore;

/// Largest page of a listing.
pub const MAX_PAGE_SIZE: usize = 1000;
const DEFAULT_PAGE_SIZE: usize = 100;

#[derive(Debug, Clone)]
pub struct Admin {
    pub(crate) store: Arc<dyn PromotionStore>,
    pub(crate) segments: Arc<dyn Segments>,
    pub(crate) clock: SharedClock,
}

/// Checks paging arguments; the token is the last id of the previous page.
pub fn page(tenant_id: &str, page_size: i32, page_token: &str) -> Result<usize> {
    let mut v = Violations::new();
    check_tenant(&mut v, tenant_id);
    v.check(
        (0..=MAX_PAGE_SIZE as i32).contains(&page_size),
        "page_size",
        format!("must be between 0 and {MAX_PAGE_SIZE}"),
    );
    v.optional_text(page_token, "page_token", MAX_ID_LEN);
    v.finish()?;
    Ok(if page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        page_size as usize
    })
}

impl Admin {
    pub fn new(
        store: Arc<dyn PromotionStore>,
        segments: Arc<dyn Segments>,
        clock: SharedClock,
    ) -> Self {
        Self {
            store,
            segments,
            clock,
        }
    }

    pub async fn program(&self, tenant_id: &str) -> Result<Program> {
        tenant(tenant_id)?;
        self.store
            .program(tenant_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("tenant {tenant_id} has no program")))
    }

    /// Saves a tenant's program; returns the program it replaced (None: the first) and the
    /// saved one. Without an `expected_version` the write is still checked against the
    /// version read as "before" (and retried when another write came between), so the
    /// before is exactly what this write replaced.
    pub async fn update_program(
        &self,
        mut program: Program,
        expected_version: i64,
    ) -> Result<(Option<Program>, Program)> {
        program.validate()?;
        if expected_version < 0 {
            return Err(Error::invalid("expected_version", "must not be negative"));
        }
        program.updated_at = self.clock.now_ms();
        let mut attempts = 0;
        loop {
            let before = self.store.program(&program.tenant_id).await?;
            let expected = match (expected_version, &before) {
                (0, Some(b)) => b.version,
                (v, _) => v,
            };
            match self.store.update_program(program.clone(), expected).await {
                Err(Error::FailedPrecondition(_)) if expected_version == 0 && attempts < 5 => {
                    attempts += 1;
                }
                saved => return Ok((before, saved?)),
            }
        }
    }

    pub async fn upsert_stores(&self, tenant_id: &str, stores: &[Store]) -> Result<usize> {
        validate_stores(tenant_id, stores)?;
        let mut v = Violations::new();
        for (i, s) in stores.iter().enumerate() {
            v.check(
                crate::calendar::known_time_zone(&s.time_zone),
                format!("stores[{i}].time_zone"),
                format!(
                    "unknown time zone {:?}: use an IANA name such as Asia/Almaty",
                    s.time_zone
                ),
            );
        }
        v.finish()?;
        self.store.upsert_stores(tenant_id, stores).await?;
        Ok(stores.len())
    }

    pub async fn upsert_products(&self, tenant_id: &str, products: &[Product]) -> Result<usize> {
        validate_products(tenant_id, products)?;
        self.store.upsert_products(tenant_id, products).await?;
        Ok(products.len())
    }

    pub async fn list_stores(
        &self,
        tenant_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Store>, String)> {
        let size = page(tenant_id, page_size, page_token)?;
        let items = self.store.list_stores(tenant_id, page_token, size).await?;
        let next = if items.len() == size {
            items.last().map(|s| s.store_id.clone())
        } else {
            None
        };
        Ok((items, next.unwrap_or_default()))
    }

    pub async fn list_products(
        &self,
        tenant_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Product>, String)> {
        let size = page(tenant_id, page_size, page_token)?;
        let items = self
            .store
            .list_products(tenant_id, page_token, size)
            .await?;
        let next = if items.len() == size {
            items.last().map(|p| p.sku.clone())
        } else {
            None
        };
        Ok((items, next.unwrap_or_default()))
    }
}
