//! Bulk import of members from a chain's previous system: rows of phone, profile, cards and
//! the points balance they carried there.
//!
//! An import is named by the caller (`import_id`) and sent in chunks. Each row that is good
//! becomes a member in one atomic write together with its cards and a row record; its
//! opening balance then goes to balance (keyed by import and row, so at most once). A row
//! that is bad is reported with its field and kept out; the rest of the chunk goes on. A
//! resumed import (the same rows sent again, whole or from any point) skips rows already
//! done and finishes an opening balance that had not gone through.

use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{Channel, check_tenant};

use crate::domain::{
    Card, CardKind, CardStatus, Date, GENERATION_ATTEMPTS, Identity, MAX_EMAIL_LEN, MAX_NAME_LEN,
    Member, MemberStatus, Profile, check_card_number, looks_like_email, new_referral_code,
    normalize_phone,
};
use crate::lifecycle::ImportRow;
use crate::store::Imported;

/// Most rows in one chunk of an import.
pub const MAX_IMPORT_ROWS: usize = 1_000;
/// Most cards one imported member brings.
pub const MAX_IMPORT_CARDS: usize = 10;
/// The largest opening balance of one member, in point minor units.
pub const MAX_OPENING_BALANCE: i64 = 1_000_000_000_000;

/// One row as it arrives.
#[derive(Debug, Clone, Default)]
pub struct RowInput {
    /// Position in the source file, echoed in errors; positive.
    pub row_number: i64,
    pub phone: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    /// (year, month, day) as given; checked here.
    pub birthday: Option<(i32, i32, i32)>,
    pub card_numbers: Vec<String>,
    pub opening_balance: i64,
}

impl RowInput {
    /// A digest of everything the row says, as sent: a resent row has the same one.
    pub fn fingerprint(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for text in [&self.phone, &self.email, &self.first_name, &self.last_name]
            .into_iter()
            .chain(&self.card_numbers)
        {
            h.update((text.len() as u64).to_le_bytes());
            h.update(text.as_bytes());
        }
        h.update((self.card_numbers.len() as u64).to_le_bytes());
        match self.birthday {
            None => h.update([0]),
            Some((y, m, d)) => {
                h.update([1]);
                for part in [y, m, d] {
                    h.update(part.to_le_bytes());
                }
            }
        }
        h.update(self.opening_balance.to_le_bytes());
        h.finalize().to_vec()
    }
}

/// Why a row was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub row_number: i64,
    pub field: String,
    pub description: String,
}

/// What one chunk did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Rows of the chunk whose member now exists (imported now or by an earlier attempt).
    pub imported: u64,
    pub errors: Vec<RowError>,
}

impl Identity {
    /// Imports one chunk of `import_id`. The call fails as a whole only for a bad chunk
    /// (nothing written) or an unreachable store or balance service (resend the chunk).
    pub async fn import_members(
        &self,
        tenant_id: &str,
        import_id: &str,
        rows: &[RowInput],
    ) -> Result<ChunkOutcome> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(import_id, "import_id", MAX_ID_LEN);
        v.check(
            !rows.is_empty() && rows.len() <= MAX_IMPORT_ROWS,
            "rows",
            format!("must hold 1 to {MAX_IMPORT_ROWS} rows"),
        );
        v.finish()?;
        let mut outcome = ChunkOutcome::default();
        for row in rows {
            match self.import_row(tenant_id, import_id, row).await? {
                Ok(()) => outcome.imported += 1,
                Err((field, description)) => outcome.errors.push(RowError {
                    row_number: row.row_number,
                    field: field.into(),
                    description,
                }),
            }
        }
        Ok(outcome)
    }

    /// One row: `Ok(Err(..))` is the row's own error, `Err` the call's.
    async fn import_row(
        &self,
        tenant_id: &str,
        import_id: &str,
        row: &RowInput,
    ) -> Result<std::result::Result<(), (&'static str, String)>> {
        if row.row_number <= 0 {
            return Ok(Err(("row_number", "must be positive".into())));
        }
        let fingerprint = row.fingerprint();
        if let Some(done) = self
            .store
            .import_row(tenant_id, import_id, row.row_number)
            .await?
        {
            return self.resumed(done, &fingerprint).await;
        }
        let member = match self.checked_row(tenant_id, row) {
            Ok(parts) => parts,
            Err(bad) => return Ok(Err(bad)),
        };
        let (mut member, profile, cards) = member;
        let record = ImportRow {
            tenant_id: tenant_id.to_string(),
            import_id: import_id.to_string(),
            row_number: row.row_number,
            member_id: member.member_id.clone(),
            opening_balance: row.opening_balance,
            balance_done: row.opening_balance == 0,
            fingerprint,
        };
        for _ in 0..GENERATION_ATTEMPTS {
            let refused = match self
                .store
                .import_member(&member, &profile, &cards, &record)
                .await?
            {
                Imported::Done => {
                    self.finish_row(record).await?;
                    return Ok(Ok(()));
                }
                Imported::CodeTaken => {
                    member.referral_code = new_referral_code();
                    continue;
                }
                Imported::PhoneTaken => ("phone", "a member with this phone exists".to_string()),
                Imported::EmailTaken => ("email", "a member with this email exists".to_string()),
                Imported::CardTaken(number) => (
                    "card_numbers",
                    format!("card {number} is bound to a member, blocked or replaced"),
                ),
            };
            // The same row imported meanwhile by a concurrent resume is not an error.
            if let Some(done) = self
                .store
                .import_row(tenant_id, import_id, row.row_number)
                .await?
            {
                return self.resumed(done, &record.fingerprint).await;
            }
            return Ok(Err(refused));
        }
        Err(Error::internal(anyhow::anyhow!(
            "could not generate a unique referral code"
        )))
    }

    /// A row whose number was imported before: the same row finishes what it had left;
    /// another row under that number is its error (rows recorded before rows were
    /// fingerprinted cannot tell, and finish).
    async fn resumed(
        &self,
        done: ImportRow,
        fingerprint: &[u8],
    ) -> Result<std::result::Result<(), (&'static str, String)>> {
        if !done.fingerprint.is_empty() && done.fingerprint != fingerprint {
            return Ok(Err((
                "row_number",
                format!(
                    "row {} of import {} was imported before with other data; give every row of an import its own number",
                    done.row_number, done.import_id
                ),
            )));
        }
        self.finish_row(done).await?;
        Ok(Ok(()))
    }

    /// Credits a row's opening balance if that has not gone through yet, and tells the
    /// consumers of the member again (a resumed row's event may not have gone out).
    async fn finish_row(&self, mut row: ImportRow) -> Result<()> {
        // The member as it is now (its survivor, if merged since).
        let member = self.current(&row.tenant_id, &row.member_id).await?;
        let profile = self.profile(&row.tenant_id, &member.member_id).await?;
        self.publish(&member, &profile).await?;
        if row.balance_done {
            return Ok(());
        }
        let key = format!("import:{}:{}", row.import_id, row.row_number);
        // The imported member first: a credit that went through before a merge answers its
        // stored reply there. Refused (its account closed by a merge), it never got the
        // points, and the survivor gets them.
        let credited = self
            .points
            .opening_balance(&row.tenant_id, &row.member_id, row.opening_balance, &key)
            .await;
        match credited {
            Err(Error::FailedPrecondition(_)) if member.member_id != row.member_id => {
                self.points
                    .opening_balance(&row.tenant_id, &member.member_id, row.opening_balance, &key)
                    .await?;
            }
            other => other?,
        }
        row.balance_done = true;
        self.store.save_import_row(&row).await
    }

    /// The member, profile and cards a row makes, or its first bad field.
    fn checked_row(
        &self,
        tenant_id: &str,
        row: &RowInput,
    ) -> std::result::Result<(Member, Profile, Vec<Card>), (&'static str, String)> {
        let phone = normalize_phone(&row.phone, self.region(""))
            .map_err(|why| ("phone", format!("phone {why}")))?;
        let email = row.email.trim().to_ascii_lowercase();
        if email.len() > MAX_EMAIL_LEN || (!email.is_empty() && !looks_like_email(&email)) {
            return Err(("email", "is not an email address".into()));
        }
        for (field, name) in [
            ("first_name", &row.first_name),
            ("last_name", &row.last_name),
        ] {
            if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
                return Err((
                    field,
                    format!("must be at most {MAX_NAME_LEN} bytes without control characters"),
                ));
            }
        }
        let birthday = match row.birthday {
            None => None,
            Some((y, m, d)) => Some(Date::checked(y, m, d).ok_or((
                "birthday",
                "must be a real date between 1900 and 2100".to_string(),
            ))?),
        };
        if row.card_numbers.len() > MAX_IMPORT_CARDS {
            return Err((
                "card_numbers",
                format!("at most {MAX_IMPORT_CARDS} cards per member"),
            ));
        }
        let mut v = Violations::new();
        for number in &row.card_numbers {
            check_card_number(&mut v, number, "card_numbers");
        }
        if v.finish().is_err() {
            return Err(("card_numbers", "card numbers are 8 to 19 digits".into()));
        }
        let mut numbers = row.card_numbers.clone();
        numbers.sort();
        numbers.dedup();
        if !(0..=MAX_OPENING_BALANCE).contains(&row.opening_balance) {
            return Err((
                "opening_balance",
                format!("must be between 0 and {MAX_OPENING_BALANCE}"),
            ));
        }
        let now = self.clock.now_ms();
        let member = Member {
            tenant_id: tenant_id.to_string(),
            member_id: uuid::Uuid::now_v7().simple().to_string(),
            status: MemberStatus::Active,
            phone,
            email,
            first_name: row.first_name.clone(),
            last_name: row.last_name.clone(),
            referral_code: new_referral_code(),
            referred_by: None,
            channel: Channel::Admin,
            store_id: String::new(),
            registered_at: now,
            updated_at: now,
        };
        let profile = Profile {
            birthday,
            ..Profile::default()
        };
        let cards = numbers
            .into_iter()
            .map(|number| Card {
                tenant_id: tenant_id.to_string(),
                number,
                kind: CardKind::Plastic,
                status: CardStatus::Active,
                member_id: Some(member.member_id.clone()),
                issued_at: now,
            })
            .collect();
        Ok((member, profile, cards))
    }
}
