//! Commit throughput of the embedded store: one writer at a time (an fsync per write)
//! versus many concurrent writers sharing group commits. Run with
//! `cargo bench -p loyalty-platform --bench commit`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use loyalty_platform::embedded::EmbeddedDb;
use loyalty_platform::error::Error;
use redb::TableDefinition;

const T: TableDefinition<u64, &[u8]> = TableDefinition::new("bench");
const WRITES: u64 = 2_000;

async fn run(db: &EmbeddedDb, writers: u64, base: u64) {
    let per = WRITES / writers;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let k = base + w * per + i;
                db.write(move |txn| {
                    let mut t = txn.open_table(T).map_err(Error::internal)?;
                    t.insert(k, [7u8; 200].as_slice())
                        .map_err(Error::internal)?;
                    Ok(())
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = EmbeddedDb::open(&dir.path().join("bench.redb")).unwrap();
    let mut group = c.benchmark_group("embedded_commit");
    group.throughput(Throughput::Elements(WRITES));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for writers in [1u64, 16, 256] {
        group.bench_function(format!("{writers}_writers"), |b| {
            let mut base = 0;
            b.to_async(&rt).iter_custom(|iters| {
                let db = db.clone();
                base += 1_000_000;
                let start_base = base * 1_000;
                async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        run(&db, writers, start_base + i * WRITES).await;
                    }
                    start.elapsed()
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
