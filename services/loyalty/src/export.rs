//! `loyalty export`: reads an export from a running reporting service over Arrow Flight and
//! writes it as a Parquet file, for data teams that want files rather than a stream.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use arrow_flight::{FlightClient, Ticket};
use futures_util::TryStreamExt;
use parquet::arrow::ArrowWriter;

#[derive(Debug, Clone)]
pub struct Request {
    pub addr: String,
    pub tenant: String,
    /// purchases, purchase_lines, refunds or member_features.
    pub kind: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub time_zone: String,
    pub out: PathBuf,
    /// Sent as `authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The CA certificate an https server is checked against.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for a server that asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The JSON ticket the Flight endpoint takes (docs/kpis.md).
fn ticket(r: &Request) -> String {
    let mut t = serde_json::json!({"tenant_id": r.tenant, "kind": r.kind});
    if let Some(f) = &r.from {
        t["start_time"] = f.clone().into();
    }
    if let Some(to) = &r.to {
        t["end_time"] = to.clone().into();
    }
    if !r.time_zone.is_empty() {
        t["time_zone"] = r.time_zone.clone().into();
    }
    t.to_string()
}

/// Writes `<out>/<tenant>-<kind>.parquet` (through a temporary file renamed when complete,
/// removed when the export fails) and returns its path and row count.
pub async fn run(r: &Request) -> anyhow::Result<(PathBuf, usize)> {
    let partial = r
        .out
        .join(format!(".{}-{}.parquet.partial", r.tenant, r.kind));
    let written = write(r, &partial).await;
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

async fn write(r: &Request, partial: &Path) -> anyhow::Result<(PathBuf, usize)> {
    std::fs::create_dir_all(&r.out)
        .with_context(|| format!("creating the output directory {}", r.out.display()))?;
    let identity = match (&r.cert, &r.key) {
        (Some(cert), Some(key)) => Some(loyalty_platform::tls::identity_from(cert, key)?),
        _ => None,
    };
    let channel = loyalty_platform::tls::connect(&r.addr, r.ca.as_deref(), identity).await?;
    let mut client = FlightClient::new(channel);
    if let Some(key) = &r.api_key {
        client
            .add_header("authorization", &format!("Bearer {key}"))
            .context("the API key is not a valid header value")?;
    }
    let mut batches = client
        .do_get(Ticket::new(ticket(r)))
        .await
        .context("starting the export")?;
    let path = r.out.join(format!("{}-{}.parquet", r.tenant, r.kind));
    let file = std::fs::File::create(partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut rows = 0;
    let mut file = Some(file);
    while let Some(batch) = batches.try_next().await.context("reading the export")? {
        rows += batch.num_rows();
        let w = match &mut writer {
            Some(w) => w,
            None => {
                let Some(f) = file.take() else {
                    bail!("the output file was already handed to the writer")
                };
                writer.insert(ArrowWriter::try_new(f, batch.schema(), None)?)
            }
        };
        w.write(&batch)?;
    }
    match writer {
        Some(w) => {
            w.close()?;
        }
        None => {
            // No rows: still a valid file with the export's columns.
            let schema = batches
                .schema()
                .cloned()
                .context("the export sent no schema")?;
            let Some(f) = file.take() else {
                bail!("the output file was already handed to the writer")
            };
            ArrowWriter::try_new(f, schema, None)?.close()?;
        }
    }
    std::fs::rename(partial, &path)
        .with_context(|| format!("moving the export into place at {}", path.display()))?;
    Ok((path, rows))
}

pub fn describe(path: &Path, rows: usize) -> String {
    format!("{rows} rows written to {}", path.display())
}
