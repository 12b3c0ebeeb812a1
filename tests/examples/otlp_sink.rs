//! An OTLP/gRPC trace receiver for benchmarks: accepts spans on loopback, prints how many
//! arrived each 10 s, and exits on Ctrl-C.
//!
//!   cargo run --release -p loyalty-e2e --example otlp_sink -- 127.0.0.1:4317

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into());
    let receiver = loyalty_e2e::OtlpReceiver::start_on(&addr).await;
    println!("otlp sink on {}", receiver.endpoint);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => println!("{} spans received", receiver.spans().len()),
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    println!("{} spans received in all", receiver.spans().len());
}
