//! Test harness: starts the real `gateway` and `billing-service` binaries on free loopback
//! ports, with a capturing upstream in place of the app, and stops them when dropped.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const JWT_SECRET: &str = "e2e-jwt-secret";
pub const WEBHOOK_SECRET: &str = "whsec_e2e_secret_for_tests_only";

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `shared/`, laid beside the repository.
#[track_caller]
pub fn shared_dir() -> PathBuf {
    let dir = repo_root().join("../shared");
    assert!(
        dir.is_dir(),
        "shared/ must sit beside the repository: {}",
        dir.display()
    );
    dir
}

/// A workspace binary built by `cargo build --workspace --bins`.
#[track_caller]
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary has a path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins`",
        path.display()
    );
    path
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound address").port()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An upstream that answers every request with 200 and remembers what it received. Its
/// responses carry its own rate-limit headers, which the gateway must replace.
pub struct CapturingUpstream {
    pub address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl CapturingUpstream {
    pub async fn start() -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(Seen {
                        method,
                        uri,
                        headers,
                        body,
                    });
                    (
                        [
                            ("x-ratelimit-limit", "999"),
                            ("ratelimit-policy", "\"app\";q=999;w=1"),
                            ("content-type", "application/json"),
                        ],
                        "{\"ok\":true}",
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { address, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|seen| seen.uri.path() == path)
            .count()
    }
}

/// A child process killed on drop.
pub struct Process {
    pub name: &'static str,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for [`Stack::start`].
#[derive(Default)]
pub struct StackOptions {
    /// Gateway configuration text, written to a temporary file that tests may rewrite; `None`
    /// uses the shipped `config/gateway.toml`.
    pub gateway_config: Option<String>,
    /// Extra environment for both services.
    pub env: Vec<(String, String)>,
    /// Stripe API base handed to billing.
    pub stripe_api_base: Option<String>,
    /// Proxy listener; defaults to a free port on 127.0.0.1.
    pub gateway_listen: Option<SocketAddr>,
    /// Send the gateway's log (its standard output) to a file read by [`Stack::gateway_log`].
    pub capture_gateway_log: bool,
}

/// The shipped gateway configuration with `extra` TOML appended.
pub fn shipped_config_with(extra: &str) -> String {
    let shipped = std::fs::read_to_string(repo_root().join("config/gateway.toml")).unwrap();
    format!("{shipped}\n{extra}\n")
}

/// Gateway, billing and a capturing upstream, each on its own free port.
pub struct Stack {
    pub gateway: SocketAddr,
    /// The gateway's configuration file (a temporary copy when the test supplied the text).
    pub config_path: PathBuf,
    pub gateway_admin: SocketAddr,
    pub billing: SocketAddr,
    pub upstream: CapturingUpstream,
    pub dir: tempfile::TempDir,
    processes: Vec<Process>,
}

impl Stack {
    pub async fn start(options: StackOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let upstream = CapturingUpstream::start().await;
        let billing: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let billing_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let gateway = options
            .gateway_listen
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let gateway_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

        let config_path = match &options.gateway_config {
            Some(text) => {
                let path = dir.path().join("gateway.toml");
                std::fs::write(&path, text).unwrap();
                path
            }
            None => repo_root().join("config/gateway.toml"),
        };
        let database = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("billing.db").display()
        );
        let stripe = options
            .stripe_api_base
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:9".into());

        let mut billing_cmd = Command::new(binary("billing-service"));
        billing_cmd
            .current_dir(repo_root())
            .args(["--config", "config/billing.toml"])
            .args(["--listen", &billing.to_string()])
            .args(["--admin-listen", &billing_admin.to_string()])
            .env("DATABASE_URL", database)
            .env("STRIPE_API_BASE", stripe)
            .env("STRIPE_SECRET_KEY", "sk_test_e2e")
            .env("STRIPE_PUBLISHABLE_KEY", "pk_test_e2e")
            .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET);
        let log_path = dir.path().join("gateway.log");
        let mut gateway_cmd = Command::new(binary("gateway"));
        if options.capture_gateway_log {
            gateway_cmd.stdout(std::fs::File::create(&log_path).unwrap());
        }
        gateway_cmd
            .current_dir(repo_root())
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", &gateway.to_string()])
            .args(["--admin-listen", &gateway_admin.to_string()])
            .args(["--upstream", &format!("app={}", upstream.address)])
            .args(["--upstream", &format!("billing={billing}")]);
        for command in [&mut billing_cmd, &mut gateway_cmd] {
            command
                .env("JWT_SECRET", JWT_SECRET)
                .env("IDENTITY_HASH_KEY", "e2e-identity-key")
                .env("RUST_LOG", "warn")
                .envs(options.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null());
        }

        let processes = vec![
            Process {
                name: "billing-service",
                child: billing_cmd.spawn().unwrap(),
            },
            Process {
                name: "gateway",
                child: gateway_cmd.spawn().unwrap(),
            },
        ];
        let stack = Self {
            gateway,
            config_path,
            gateway_admin,
            billing,
            upstream,
            dir,
            processes,
        };
        stack.wait_healthy(billing_admin).await;
        stack.wait_healthy(gateway_admin).await;
        stack
    }

    async fn wait_healthy(&self, admin: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        while Instant::now() < deadline {
            let url = format!("http://{admin}/healthz");
            if let Ok(response) = client.get(url).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("service with admin {admin} did not become healthy");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway_admin)
    }

    /// What the gateway logged, when the stack was started with `capture_gateway_log`.
    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Waits until the gateway's `/readyz` answers 200 (a Redis store is connected).
    pub async fn wait_ready(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Ok(response) = reqwest::get(self.admin_url("/readyz")).await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("gateway at {} did not become ready", self.gateway);
    }

    /// The gateway's process id, for signals.
    pub fn gateway_pid(&self) -> u32 {
        let gateway = self
            .processes
            .iter()
            .find(|process| process.name == "gateway");
        gateway.expect("the stack runs a gateway").child.id()
    }

    /// The value of an unlabelled or fully labelled sample in `/metrics`, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// Sends `count` POSTs to `path` from `client` and returns the statuses.
pub async fn statuses(client: &reqwest::Client, url: &str, count: usize) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..count {
        statuses.push(client.post(url).send().await.unwrap().status().as_u16());
    }
    statuses
}

/// The values of header `name`, each occurrence separately.
pub fn header_values<'a>(response: &'a reqwest::Response, name: &str) -> Vec<&'a str> {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect()
}

/// A client whose connections come from `source` (any 127.x.y.z works on Linux), so that each
/// test can act as a fresh client address.
pub fn client_from(source: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(source))
        .build()
        .unwrap()
}

/// A bearer token for `user`, valid for an hour, signed with the stack's secret.
pub fn token_for(user: &str) -> String {
    tollgate_auth::mint_hs256(JWT_SECRET.as_bytes(), user, Duration::from_secs(3600))
}

/// A `Stripe-Signature` header for `body` at time `t`, as Stripe computes it.
pub fn stripe_signature(body: &[u8], t: u64, secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts `event` to `path` through the gateway, signed now with the stack's webhook secret as
/// Stripe would sign it.
pub async fn post_signed(
    client: &reqwest::Client,
    stack: &Stack,
    path: &str,
    event: Vec<u8>,
) -> reqwest::Response {
    let signature = stripe_signature(&event, unix_now(), WEBHOOK_SECRET);
    client
        .post(stack.url(path))
        .header("stripe-signature", signature)
        .body(event)
        .send()
        .await
        .unwrap()
}

/// The paid `checkout.session.completed` fixture, for the `starter` package of user 42, with
/// its event and session ids replaced.
pub fn paid_checkout_event(event_id: &str, session_id: &str) -> Vec<u8> {
    let path = shared_dir().join("stripe/fixtures/event_checkout_session_completed.json");
    let mut event: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    event["id"] = event_id.into();
    let session = &mut event["data"]["object"];
    session["id"] = session_id.into();
    session["metadata"]["package_id"] = "starter".into();
    serde_json::to_vec_pretty(&event).unwrap()
}

/// A signed event of a type billing ignores.
pub fn ignored_event(event_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": event_id,
        "object": "event",
        "type": "customer.tax_id.created",
        "created": unix_now(),
        "data": {"object": {"id": "txi_e2e", "object": "tax_id"}},
    }))
    .unwrap()
}

/// A `redis-server` owned by one test, on a free loopback port, with nothing on disk; killed
/// on drop. Tests stop and resume it without disturbing the shared Redis on 6379.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// A standalone server.
    pub fn start() -> Self {
        Self::spawn(&[])
    }

    /// A server ready to join a Cluster (see [`redis_cluster`]).
    pub fn start_cluster_node() -> Self {
        Self::spawn(&[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
    }

    fn spawn(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = Self {
            port,
            child: launch_redis(dir.path(), port, extra),
            _dir: dir,
        };
        server.wait_up();
        server
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            let port = self.port;
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: its data and connections are gone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts an empty server on the port of a killed one.
    pub fn start_again(&mut self) {
        self.child = launch_redis(self._dir.path(), self.port, &[]);
        self.wait_up();
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch_redis(dir: &std::path::Path, port: u16, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .current_dir(dir)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(extra)
        .stdout(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("redis-server is installed")
}

/// Runs `redis-cli -p port args...` on loopback and returns its output.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is installed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn signal(pid: u32, which: &str) {
    let _ = Command::new("kill")
        .args([which, &pid.to_string()])
        .status();
}

/// Three fresh nodes joined into a Cluster with no replicas, all slots covered.
pub fn redis_cluster() -> Vec<RedisServer> {
    let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_cluster_node()).collect();
    let addresses: Vec<String> = nodes
        .iter()
        .map(|node| format!("127.0.0.1:{}", node.port))
        .collect();
    let mut create = Command::new("redis-cli");
    create
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    assert!(
        create.status().unwrap().success(),
        "redis-cli --cluster create"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for node in &nodes {
        while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nodes
}
