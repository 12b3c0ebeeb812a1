//! A throwaway `redis-server` for tests and benchmarks: started on a free loopback port
//! with persistence off, in its own directory, stopped when dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl RedisServer {
    /// Starts a server on a free port; fails with a hint when `redis-server` is missing.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts a server that keeps an append-only file (`--appendonly yes`) in its
    /// [`RedisServer::dir`].
    pub fn start_with_aof() -> anyhow::Result<Self> {
        Self::start_with(&["--appendonly", "yes"])
    }

    fn start_with(extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("loyalty-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts `n` cluster-enabled servers and joins them into one Redis Cluster (no
    /// replicas) with `redis-cli --cluster create`; returns once every slot is served.
    pub fn start_cluster(n: usize) -> anyhow::Result<Vec<Self>> {
        Self::start_cluster_with(n, 0, &[])
    }

    /// A cluster of `primaries` primaries with `replicas` replicas each, every server also
    /// given `extra` arguments (e.g. `--appendonly yes`).
    pub fn start_cluster_with(
        primaries: usize,
        replicas: usize,
        extra: &[&str],
    ) -> anyhow::Result<Vec<Self>> {
        let mut args = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
        args.extend_from_slice(extra);
        let nodes = (0..primaries * (1 + replicas))
            .map(|_| Self::start_with(&args))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &node.port.to_string(), "cluster", "info"])
                    .output()?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the Redis Cluster did not become ready");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(nodes)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting redis-server (install it, e.g. `apt-get install redis-server`; \
                 ./scripts/test does this itself)",
            )?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not become ready", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory: its snapshot and append-only files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Writes a snapshot (`SAVE`) that the next [`RedisServer::restart`] loads: a way to
    /// make a server come back with old data, as after a restore or a lagging failover.
    pub fn save(&self) -> anyhow::Result<()> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SAVE"])
            .output()
            .context("running redis-cli SAVE")?;
        if !String::from_utf8_lossy(&out.stdout).contains("OK") {
            bail!("SAVE failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(())
    }

    /// Kills the server the hard way (SIGKILL): everything in memory is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory: empty, unless
    /// [`RedisServer::save`] left a snapshot or the server keeps an append-only file
    /// ([`RedisServer::start_with_aof`]), which it loads.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
