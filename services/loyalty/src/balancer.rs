//! Channels to peer services. A peer URL whose host is a DNS name gets a channel that spreads
//! calls, one by one, over every address the name resolves to, and a background task that
//! resolves the name again every refresh interval. Pointed at a Kubernetes headless Service,
//! which resolves to every ready pod, calls reach all pods instead of the one a single HTTP/2
//! connection happens to land on. A URL with an IP address is one endpoint, as before.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint, Uri};

/// Finds the addresses of a host name.
#[async_trait::async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// The system resolver.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dns;

#[async_trait::async_trait]
impl Resolve for Dns {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// The settings every endpoint of a peer gets (timeouts, socket options).
pub type Configure = Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>;

/// One entry in a balanced channel's set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// One resolved address.
    Addr(SocketAddr),
    /// The URL itself, resolved by the connector at connect time. Used only while no address
    /// is known, so that calls fail as they would without balancing instead of waiting.
    Url,
}

/// A channel to the peer at `url`: balanced over the addresses of its host when the host is a
/// DNS name, a single endpoint when it is an IP address. Must be called within a Tokio runtime.
pub fn channel(
    peer: &'static str,
    url: &str,
    configure: Configure,
    refresh: Duration,
    resolver: Arc<dyn Resolve>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = configure(Endpoint::from_shared(url.to_owned())?);
    let Some(target) = Target::of(peer, &endpoint, configure) else {
        return Ok(endpoint.connect_lazy());
    };
    let (channel, changes) = Channel::balance_channel(16);
    tokio::spawn(refresh_addresses(target, resolver, refresh, changes));
    Ok(channel)
}

/// What the refresh task needs to know about one peer.
struct Target {
    peer: &'static str,
    host: String,
    port: u16,
    /// The URL as configured: its scheme and authority go on every request (`:authority`).
    uri: Uri,
    /// The endpoint for the URL itself, see [`Key::Url`].
    url_endpoint: Endpoint,
    configure: Configure,
}

impl Target {
    /// `None` when the URL's host is an IP address (or missing): nothing to resolve.
    fn of(peer: &'static str, endpoint: &Endpoint, configure: Configure) -> Option<Self> {
        let uri = endpoint.uri().clone();
        let host = uri.host()?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return None;
        }
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        Some(Self {
            peer,
            host: host.to_owned(),
            port,
            uri,
            url_endpoint: endpoint.clone(),
            configure,
        })
    }

    /// An endpoint that connects to `addr` and sends the configured URL's authority.
    fn endpoint(&self, addr: SocketAddr) -> Option<Endpoint> {
        let scheme = self.uri.scheme_str().unwrap_or("http");
        let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).ok()?;
        Some((self.configure)(endpoint).origin(self.uri.clone()))
    }
}

/// Resolves the target now and then every `every`, sending the changes to the set until the
/// channel is gone. A failed or empty answer changes nothing.
async fn refresh_addresses(
    target: Target,
    resolver: Arc<dyn Resolve>,
    every: Duration,
    changes: Sender<Change<Key, Endpoint>>,
) {
    let mut known: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut url_in_set = false;
    loop {
        let answer = tokio::select! {
            answer = resolver.resolve(&target.host, target.port) => answer,
            () = changes.closed() => return,
        };
        let mut sends = Vec::new();
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let fresh: BTreeSet<SocketAddr> = addrs.into_iter().collect();
                // New addresses join before vanished ones leave, so the set is never empty.
                for &addr in fresh.difference(&known) {
                    if let Some(endpoint) = target.endpoint(addr) {
                        sends.push(Change::Insert(Key::Addr(addr), endpoint));
                    }
                }
                for &addr in known.difference(&fresh) {
                    sends.push(Change::Remove(Key::Addr(addr)));
                }
                if url_in_set {
                    sends.push(Change::Remove(Key::Url));
                    url_in_set = false;
                }
                if fresh != known {
                    tracing::info!(
                        peer = target.peer,
                        addresses = fresh.len(),
                        "the peer's addresses changed"
                    );
                }
                known = fresh;
            }
            Err(error) => tracing::warn!(
                peer = target.peer,
                %error,
                "could not resolve the peer's name; keeping its last known addresses"
            ),
            Ok(_) => tracing::warn!(
                peer = target.peer,
                "the peer's name resolved to no address; keeping its last known addresses"
            ),
        }
        if known.is_empty() && !url_in_set {
            sends.push(Change::Insert(Key::Url, target.url_endpoint.clone()));
            url_in_set = true;
        }
        for change in sends {
            if changes.send(change).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = changes.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpListener;
    use tokio::sync::{mpsc, watch};
    use tonic::Request;
    use tonic::transport::Server;
    use tonic::transport::server::TcpIncoming;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::health_server::HealthServer;
    use tonic_health::server::{HealthReporter, HealthService};

    use super::*;

    /// Answers from a script, one per lookup; the last answer repeats. Publishes how many
    /// lookups it has answered.
    struct Scripted {
        answers: Mutex<VecDeque<io::Result<Vec<SocketAddr>>>>,
        last: Mutex<Option<io::Result<Vec<SocketAddr>>>>,
        lookups: watch::Sender<usize>,
    }

    impl Scripted {
        fn new(answers: Vec<io::Result<Vec<SocketAddr>>>) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers.into()),
                last: Mutex::new(None),
                lookups: watch::Sender::new(0),
            })
        }

        /// Waits until at least `n` lookups have been answered.
        async fn answered(&self, n: usize) {
            let mut lookups = self.lookups.subscribe();
            lookups.wait_for(|&done| done >= n).await.unwrap();
        }
    }

    fn copy(answer: &io::Result<Vec<SocketAddr>>) -> io::Result<Vec<SocketAddr>> {
        match answer {
            Ok(addrs) => Ok(addrs.clone()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }

    #[async_trait::async_trait]
    impl Resolve for Scripted {
        async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            assert_eq!(host, "peer.test", "looked up port {port}");
            let next = self.answers.lock().unwrap().pop_front();
            let answer = match next {
                Some(answer) => {
                    *self.last.lock().unwrap() = Some(copy(&answer));
                    answer
                }
                None => copy(self.last.lock().unwrap().as_ref().unwrap()),
            };
            self.lookups.send_modify(|n| *n += 1);
            answer
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn failure() -> io::Result<Vec<SocketAddr>> {
        Err(io::Error::other("no such host"))
    }

    fn settings(timeout: Duration) -> Configure {
        Arc::new(move |e: Endpoint| {
            e.connect_timeout(timeout)
                .timeout(timeout)
                .tcp_nodelay(true)
        })
    }

    /// A change, without its endpoint (which cannot be compared).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Insert(Key, String),
        Remove(Key),
    }

    fn seen(change: Change<Key, Endpoint>) -> Seen {
        match change {
            Change::Insert(key, endpoint) => Seen::Insert(key, endpoint.uri().to_string()),
            Change::Remove(key) => Seen::Remove(key),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_set_follows_the_answers() {
        let (a, b, c) = (
            addr("10.0.0.1:50051"),
            addr("10.0.0.2:50051"),
            addr("[fd00::3]:50051"),
        );
        let resolver = Scripted::new(vec![
            failure(),
            Ok(vec![a]),
            Ok(vec![b, a, a]),
            Ok(vec![b]),
            failure(),
            Ok(vec![]),
            Ok(vec![c, b]),
        ]);
        let url = "http://peer.test:50051";
        let endpoint = Endpoint::from_static(url);
        let target = Target::of("identity", &endpoint, settings(Duration::from_secs(1))).unwrap();
        assert_eq!((target.host.as_str(), target.port), ("peer.test", 50051));
        let (tx, mut rx) = mpsc::channel(1);
        let task = tokio::spawn(refresh_addresses(
            target,
            resolver.clone(),
            Duration::from_secs(5),
            tx,
        ));

        let mut changes = Vec::new();
        for _ in 0..6 {
            changes.push(seen(rx.recv().await.unwrap()));
        }
        assert_eq!(
            changes,
            [
                // No address yet: the URL itself stands in.
                Seen::Insert(Key::Url, "http://peer.test:50051/".into()),
                Seen::Insert(Key::Addr(a), "http://10.0.0.1:50051/".into()),
                Seen::Remove(Key::Url),
                Seen::Insert(Key::Addr(b), "http://10.0.0.2:50051/".into()),
                Seen::Remove(Key::Addr(a)),
                // The failure and the empty answer in between changed nothing.
                Seen::Insert(Key::Addr(c), "http://[fd00::3]:50051/".into()),
            ]
        );
        // The last answer repeats and changes nothing more.
        resolver.answered(10).await;
        assert!(rx.try_recv().is_err());

        // Dropping the set's receiver ends the task.
        drop(rx);
        task.await.unwrap();
    }

    #[test]
    fn ip_addresses_are_not_resolved() {
        let configure = settings(Duration::from_secs(1));
        for url in [
            "http://127.0.0.1:50051",
            "http://[::1]:50051",
            "https://10.1.2.3",
        ] {
            let endpoint = Endpoint::from_shared(url).unwrap();
            assert!(
                Target::of("balance", &endpoint, configure.clone()).is_none(),
                "{url}"
            );
        }
        let endpoint = Endpoint::from_static("https://balance.loyalty.svc");
        let target = Target::of("balance", &endpoint, configure).unwrap();
        assert_eq!(
            (target.host.as_str(), target.port),
            ("balance.loyalty.svc", 443)
        );
        let one = target.endpoint(addr("10.0.0.7:443")).unwrap();
        assert_eq!(one.uri().to_string(), "https://10.0.0.7:443/");
    }

    /// A health server on `addr` that counts the calls it answers.
    async fn counting_server(listener: TcpListener) -> Arc<AtomicUsize> {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let health = HealthServer::with_interceptor(
            HealthService::from_health_reporter(HealthReporter::new()),
            move |request: Request<()>| {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(request)
            },
        );
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        calls
    }

    /// Listeners on 127.0.0.1:P and 127.0.0.2:P for one free port P.
    async fn two_loopback_listeners() -> (TcpListener, TcpListener) {
        for _ in 0..50 {
            let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = first.local_addr().unwrap().port();
            if let Ok(second) = TcpListener::bind(("127.0.0.2", port)).await {
                return (first, second);
            }
        }
        panic!("no port free on both 127.0.0.1 and 127.0.0.2");
    }

    /// Makes `n` health calls through `channel`; all must succeed.
    async fn call(channel: &Channel, n: usize) {
        let mut client = HealthClient::new(channel.clone());
        for _ in 0..n {
            client
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap();
        }
    }

    async fn balanced_pair(
        answers: impl FnOnce(SocketAddr, SocketAddr) -> Vec<io::Result<Vec<SocketAddr>>>,
    ) -> (Channel, Arc<Scripted>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let (first, second) = two_loopback_listeners().await;
        let (a, b) = (first.local_addr().unwrap(), second.local_addr().unwrap());
        let (calls_a, calls_b) = (counting_server(first).await, counting_server(second).await);
        let resolver = Scripted::new(answers(a, b));
        let channel = channel(
            "identity",
            &format!("http://peer.test:{}", a.port()),
            settings(Duration::from_secs(5)),
            Duration::from_millis(10),
            resolver.clone(),
        )
        .unwrap();
        (channel, resolver, calls_a, calls_b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_spread_over_every_address() {
        let (channel, resolver, calls_a, calls_b) =
            balanced_pair(|a, b| vec![Ok(vec![a, b])]).await;
        // The first round's changes are all sent before the second lookup.
        resolver.answered(2).await;
        call(&channel, 50).await;
        let (a, b) = (
            calls_a.load(Ordering::Relaxed),
            calls_b.load(Ordering::Relaxed),
        );
        assert_eq!(a + b, 50);
        assert!(a > 0 && b > 0, "127.0.0.1 got {a} calls, 127.0.0.2 got {b}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_lookup_keeps_the_addresses() {
        let (channel, resolver, calls_a, calls_b) =
            balanced_pair(|a, b| vec![Ok(vec![a, b]), failure(), Ok(vec![])]).await;
        // Both the failure and the empty answer (which then repeats) have been handled.
        resolver.answered(4).await;
        call(&channel, 50).await;
        let (a, b) = (
            calls_a.load(Ordering::Relaxed),
            calls_b.load(Ordering::Relaxed),
        );
        assert_eq!(a + b, 50);
        assert!(a > 0 && b > 0, "127.0.0.1 got {a} calls, 127.0.0.2 got {b}");
    }
}
