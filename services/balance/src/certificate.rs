//! Gift certificates: stored value in money, spent as a payment method, refunded back to,
//! expiring at a time. Pure rules; the store applies them atomically per certificate.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Money has 2 fraction digits.
pub const MONEY_SCALE: u32 = 2;
/// Largest value of one certificate or operation.
pub const MAX_VALUE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
/// Certificate codes: 4 to 32 letters, digits or dashes.
pub const MAX_CODE_LEN: usize = 32;
/// Most operations kept per certificate.
pub const MAX_OPERATIONS: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Active,
    Spent,
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub code: String,
    pub initial: Decimal,
    pub remaining: Decimal,
    pub spent: Decimal,
    pub refunded: Decimal,
    pub issued_at: Millis,
    pub expire_at: Option<Millis>,
    pub operations: u32,
}

impl Certificate {
    pub fn status(&self, now: Millis) -> Status {
        if self.expire_at.is_some_and(|e| now >= e) {
            Status::Expired
        } else if self.remaining.is_zero() {
            Status::Spent
        } else {
            Status::Active
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertOp {
    Issue {
        value: Decimal,
        expire_at: Option<Millis>,
    },
    Spend {
        amount: Decimal,
        reference: String,
    },
    Refund {
        amount: Decimal,
        reference: String,
    },
}

impl CertOp {
    pub fn fingerprint(&self) -> String {
        let bytes = postcard::to_stdvec(self).unwrap_or_default();
        Sha256::digest(&bytes)
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What an operation left, kept under its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub fingerprint: String,
    pub certificate: Certificate,
}

/// Checks a money amount: positive, at most 2 fraction digits, bounded.
pub fn check_money(field: &str, value: Decimal) -> Result<()> {
    if value <= Decimal::ZERO {
        return Err(Error::invalid(field, "must be positive"));
    }
    if value.normalize().scale() > MONEY_SCALE {
        return Err(Error::invalid(
            field,
            format!("has more than {MONEY_SCALE} fraction digits"),
        ));
    }
    if value > MAX_VALUE {
        return Err(Error::invalid(
            field,
            format!("must be at most {MAX_VALUE}"),
        ));
    }
    Ok(())
}

/// Checks a certificate code's shape.
pub fn check_code(code: &str) -> Result<()> {
    if !(4..=MAX_CODE_LEN).contains(&code.len())
        || !code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::invalid(
            "code",
            format!("must be 4 to {MAX_CODE_LEN} letters, digits or dashes"),
        ));
    }
    Ok(())
}

/// Applies `op` to the certificate `code` (`None`: not issued yet) at `now`.
pub fn apply(
    current: Option<&Certificate>,
    code: &str,
    op: &CertOp,
    now: Millis,
) -> Result<Certificate> {
    match (current, op) {
        (Some(_), CertOp::Issue { .. }) => Err(Error::AlreadyExists(format!(
            "certificate {code} already exists"
        ))),
        (None, CertOp::Issue { value, expire_at }) => {
            check_money("value", *value)?;
            if expire_at.is_some_and(|e| e <= now) {
                return Err(Error::invalid("expire_time", "must be in the future"));
            }
            Ok(Certificate {
                code: code.to_string(),
                initial: *value,
                remaining: *value,
                spent: Decimal::ZERO,
                refunded: Decimal::ZERO,
                issued_at: now,
                expire_at: *expire_at,
                operations: 1,
            })
        }
        (None, _) => Err(Error::NotFound(format!("no certificate {code}"))),
        (Some(c), CertOp::Spend { amount, .. } | CertOp::Refund { amount, .. }) => {
            check_money("amount", *amount)?;
            if c.status(now) == Status::Expired {
                return Err(Error::FailedPrecondition(format!(
                    "certificate {code} has expired"
                )));
            }
            if c.operations as usize >= MAX_OPERATIONS {
                return Err(Error::FailedPrecondition(format!(
                    "certificate {code} has reached {MAX_OPERATIONS} operations"
                )));
            }
            let mut next = c.clone();
            next.operations += 1;
            if matches!(op, CertOp::Spend { .. }) {
                if *amount > c.remaining {
                    return Err(Error::FailedPrecondition(format!(
                        "certificate {code} has {} left, {amount} requested",
                        c.remaining
                    )));
                }
                next.remaining -= amount;
                next.spent += amount;
            } else {
                let refundable = c.spent - c.refunded;
                if *amount > refundable {
                    return Err(Error::FailedPrecondition(format!(
                        "only {refundable} spent from certificate {code} can be refunded, {amount} requested"
                    )));
                }
                next.remaining += amount;
                next.refunded += amount;
            }
            Ok(next)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn spend_refund_and_expire() {
        let issue = CertOp::Issue {
            value: d("5000.00"),
            expire_at: Some(1_000),
        };
        let c = apply(None, "GIFT-1", &issue, 0).unwrap();
        let spend = |a: &str| CertOp::Spend {
            amount: d(a),
            reference: "R".into(),
        };
        let refund = |a: &str| CertOp::Refund {
            amount: d(a),
            reference: "R".into(),
        };
        let c = apply(Some(&c), "GIFT-1", &spend("1200.50"), 1).unwrap();
        assert_eq!(c.remaining, d("3799.50"));
        assert!(matches!(
            apply(Some(&c), "GIFT-1", &spend("3799.51"), 1),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            apply(Some(&c), "GIFT-1", &refund("1200.51"), 1),
            Err(Error::FailedPrecondition(_))
        ));
        let c = apply(Some(&c), "GIFT-1", &refund("200.50"), 2).unwrap();
        assert_eq!(c.remaining, d("4000.00"));
        let c = apply(Some(&c), "GIFT-1", &spend("4000"), 3).unwrap();
        assert_eq!(c.status(3), Status::Spent);
        assert_eq!(c.status(1_000), Status::Expired);
        assert!(matches!(
            apply(Some(&c), "GIFT-1", &refund("1"), 1_000),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            apply(None, "X", &spend("1"), 0),
            Err(Error::NotFound(_))
        ));
        assert!(apply(None, "X", &spend("0.001"), 0).is_err());
    }
}

/// Storage of certificates: one certificate's operations apply atomically.
#[async_trait::async_trait]
pub trait CertificateStore: Send + Sync + std::fmt::Debug {
    /// Applies `op` to certificate `code` under idempotency key `key` (scoped to the
    /// certificate; for issues, to the tenant) with fingerprint `fingerprint`. A retry
    /// returns the stored certificate; the same key with another operation is
    /// `AlreadyExists`.
    async fn execute(
        &self,
        tenant_id: &str,
        code: &str,
        key: &str,
        fingerprint: &str,
        op: CertOp,
        now: Millis,
    ) -> Result<Certificate>;
    async fn get(&self, tenant_id: &str, code: &str) -> Result<Option<Certificate>>;
}

/// The gift certificate service.
#[derive(Debug, Clone)]
pub struct GiftCertificates {
    store: std::sync::Arc<dyn CertificateStore>,
    clock: loyalty_platform::clock::SharedClock,
}

/// Letters and digits that cannot be mistaken for one another when read aloud or printed.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

impl GiftCertificates {
    pub fn new(
        store: std::sync::Arc<dyn CertificateStore>,
        clock: loyalty_platform::clock::SharedClock,
    ) -> Self {
        Self { store, clock }
    }

    pub fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    fn check(tenant_id: &str, key: &str) -> Result<()> {
        let mut v = loyalty_platform::error::Violations::new();
        loyalty_platform::types::check_tenant(&mut v, tenant_id);
        v.text(key, "idempotency_key", crate::service::MAX_KEY_LEN);
        v.finish()
    }

    /// Issues a certificate; an empty `code` gets a generated one (16 characters).
    pub async fn issue(
        &self,
        tenant_id: &str,
        key: &str,
        code: &str,
        value: Decimal,
        expire_at: Option<Millis>,
    ) -> Result<Certificate> {
        Self::check(tenant_id, key)?;
        if !code.is_empty() {
            check_code(code)?;
        }
        check_money("value", value)?;
        let op = CertOp::Issue { value, expire_at };
        let fingerprint = format!("{}:{code}", op.fingerprint());
        let code = if code.is_empty() {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..16)
                .map(|_| CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char)
                .collect()
        } else {
            code.to_string()
        };
        self.store
            .execute(tenant_id, &code, key, &fingerprint, op, self.now())
            .await
    }

    pub async fn get(&self, tenant_id: &str, code: &str) -> Result<Certificate> {
        loyalty_platform::types::tenant(tenant_id)?;
        check_code(code)?;
        self.store
            .get(tenant_id, code)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no certificate {code}")))
    }

    /// Spends (`refund == false`) or refunds `amount` of certificate `code`.
    pub async fn change(
        &self,
        tenant_id: &str,
        code: &str,
        key: &str,
        amount: Decimal,
        reference: String,
        refund: bool,
    ) -> Result<Certificate> {
        Self::check(tenant_id, key)?;
        check_code(code)?;
        check_money("amount", amount)?;
        let mut v = loyalty_platform::error::Violations::new();
        v.optional_text(&reference, "reference", crate::service::MAX_REFERENCE_LEN);
        v.finish()?;
        let op = if refund {
            CertOp::Refund { amount, reference }
        } else {
            CertOp::Spend { amount, reference }
        };
        let fingerprint = op.fingerprint();
        self.store
            .execute(tenant_id, code, key, &fingerprint, op, self.now())
            .await
    }
}
