//! ScyllaDB: one shared session per process, and versioned CQL migrations applied by
//! `loyalty migrate` (never implicitly at service start).
//!
//! Applied migrations are recorded in `schema_migrations` with a checksum of their text; a
//! migration whose text changed after it was applied is an error, never silently re-run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::pager::TypedRowStream;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{ExecutionError, RequestAttemptError};
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use sha2::{Digest, Sha256};

use crate::config::ScyllaConfig;
use crate::error::Error;

/// One versioned schema change of one service.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub service: &'static str,
    pub version: i32,
    pub name: &'static str,
    /// CQL statements separated by `;` at line ends; `--` comments are allowed.
    pub cql: &'static str,
}

impl Migration {
    pub fn checksum(&self) -> String {
        Sha256::digest(self.cql.as_bytes())
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The statements, without comments.
    pub fn statements(&self) -> Vec<String> {
        let text: String = self
            .cql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        text.split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Connects to the cluster (no keyspace selected).
pub async fn connect_cluster(config: &ScyllaConfig) -> anyhow::Result<Session> {
    let profile = ExecutionProfile::builder()
        .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
        .build();
    SessionBuilder::new()
        .known_nodes(&config.nodes)
        .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .with_context(|| format!("connecting to ScyllaDB at {}", config.nodes.join(", ")))
}

/// Connects and selects the configured keyspace, which `loyalty migrate` created.
pub async fn connect(config: &ScyllaConfig) -> anyhow::Result<Arc<Session>> {
    let session = connect_cluster(config).await?;
    session
        .use_keyspace(&config.keyspace, true)
        .await
        .with_context(|| {
            format!(
                "keyspace {} is missing: run `loyalty migrate` first",
                config.keyspace
            )
        })?;
    Ok(Arc::new(session))
}

/// Creates the keyspace if needed and applies every pending migration in order. Returns
/// the migrations applied now.
pub async fn migrate(
    config: &ScyllaConfig,
    migrations: &[Migration],
) -> anyhow::Result<Vec<String>> {
    let session = connect_cluster(config).await?;
    let ks = &config.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {} {}",
                config.replication, config.keyspace_options
            ),
            (),
        )
        .await
        .context("creating the keyspace")?;
    session.use_keyspace(ks, true).await?;
    session
        .query_unpaged(
            "CREATE TABLE IF NOT EXISTS schema_migrations (service text, version int, \
             name text, checksum text, applied_at timestamp, PRIMARY KEY (service, version))",
            (),
        )
        .await
        .context("creating schema_migrations")?;
    let mut applied_now = Vec::new();
    for m in migrations {
        let existing = session
            .query_unpaged(
                "SELECT checksum FROM schema_migrations WHERE service = ? AND version = ?",
                (m.service, m.version),
            )
            .await?
            .into_rows_result()?
            .maybe_first_row::<(String,)>()?;
        match existing {
            Some((checksum,)) if checksum == m.checksum() => continue,
            Some(_) => bail!(
                "migration {} {:04} {} changed after it was applied; write a new migration instead",
                m.service,
                m.version,
                m.name
            ),
            None => {}
        }
        for statement in m.statements() {
            session
                .query_unpaged(statement.clone(), ())
                .await
                .with_context(|| format!("{} {:04}: {statement}", m.service, m.version))?;
        }
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (service, version, name, checksum, applied_at) \
                 VALUES (?, ?, ?, ?, toTimestamp(now()))",
                (m.service, m.version, m.name, m.checksum()),
            )
            .await?;
        applied_now.push(format!("{} {:04} {}", m.service, m.version, m.name));
    }
    Ok(applied_now)
}

/// Prepares `cql` with the consistency every statement of ours uses: `LOCAL_QUORUM`, and
/// `LOCAL_SERIAL` for the Paxos round of a conditional one.
pub async fn prepare(
    session: &Session,
    cql: &'static str,
) -> anyhow::Result<scylla::statement::prepared::PreparedStatement> {
    let mut p = session.prepare(cql).await?;
    p.set_consistency(scylla::statement::Consistency::LocalQuorum);
    p.set_serial_consistency(Some(scylla::statement::SerialConsistency::LocalSerial));
    Ok(p)
}

/// Runs a prepared statement once, unpaged.
pub async fn run(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> crate::error::Result<QueryResult> {
    session
        .execute_unpaged(statement, values)
        .await
        .map_err(execution_error)
}

/// The first row a statement returns, if any.
pub async fn first_row<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> crate::error::Result<Option<R>>
where
    R: for<'f> DeserializeRow<'f, 'f>,
{
    run(session, statement, values)
        .await?
        .into_rows_result()
        .map_err(rows_error)?
        .maybe_first_row::<R>()
        .map_err(rows_error)
}

/// A statement's rows, fetched a page at a time as they are read.
pub async fn row_stream<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> crate::error::Result<TypedRowStream<R>>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm>,
{
    session
        .execute_iter(statement.clone(), values)
        .await
        .map_err(|e| Error::Unavailable(format!("scylladb: {e}")))?
        .rows_stream::<R>()
        .map_err(rows_error)
}

/// Every row a statement returns, fetched a page at a time.
pub async fn all_rows<R>(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> crate::error::Result<Vec<R>>
where
    R: for<'f, 'm> DeserializeRow<'f, 'm>,
{
    use tokio_stream::StreamExt;
    let mut rows = row_stream(session, statement, values).await?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().await {
        out.push(row.map_err(|e| Error::Unavailable(format!("scylladb: {e}")))?);
    }
    Ok(out)
}

/// A driver error reading rows: the reply was not what the statement returns.
pub fn rows_error(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::internal(anyhow::Error::new(e))
}

/// Whether a conditional write applied: `[applied]` is the first column of every row.
pub fn applied(result: scylla::response::query_result::QueryResult) -> crate::error::Result<bool> {
    let rows = result.into_rows_result().map_err(rows_error)?;
    let mut all = true;
    for row in rows.rows::<scylla::value::Row>().map_err(rows_error)? {
        let row = row.map_err(rows_error)?;
        all &= matches!(
            row.columns.first(),
            Some(Some(scylla::value::CqlValue::Boolean(true)))
        );
    }
    Ok(all)
}

/// Maps a driver error: connection trouble and timeouts are `Unavailable` (the caller may
/// retry with its idempotency key), the rest internal.
pub fn execution_error(e: ExecutionError) -> Error {
    let unavailable = match &e {
        ExecutionError::ConnectionPoolError(_)
        | ExecutionError::EmptyPlan
        | ExecutionError::RequestTimeout(_) => true,
        ExecutionError::LastAttemptError(a) => matches!(
            a,
            RequestAttemptError::BrokenConnectionError(_)
                | RequestAttemptError::UnableToAllocStreamId
                | RequestAttemptError::DbError(
                    scylla::errors::DbError::Unavailable { .. }
                        | scylla::errors::DbError::Overloaded
                        | scylla::errors::DbError::ReadTimeout { .. }
                        | scylla::errors::DbError::WriteTimeout { .. }
                        | scylla::errors::DbError::IsBootstrapping,
                    _
                )
        ),
        _ => false,
    };
    if unavailable {
        Error::Unavailable(format!("scylladb: {e}"))
    } else {
        Error::internal(anyhow::anyhow!("scylladb: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_and_comments_drop() {
        let m = Migration {
            service: "s",
            version: 1,
            name: "n",
            cql: "-- a table\nCREATE TABLE a (x int PRIMARY KEY);\n\n-- b\nCREATE TABLE b (y int PRIMARY KEY);\n",
        };
        assert_eq!(
            m.statements(),
            [
                "CREATE TABLE a (x int PRIMARY KEY)",
                "CREATE TABLE b (y int PRIMARY KEY)"
            ]
        );
        assert_eq!(m.checksum().len(), 32);
    }
}
