//! Who the client is, end to end: forwarding headers, IPv6 grouping, fingerprints and bearer
//! tokens can never buy a client more than its budget.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::{
    client_from, header_values, shipped_config_with, statuses, token_for, Stack, StackOptions,
};
use reqwest::Client;

async fn post_with(client: &Client, stack: &Stack, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = client.post(stack.url("/api/v1/generate"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn statuses_with(
    client: &Client,
    stack: &Stack,
    headers: &[(&str, &str)],
    n: usize,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(post_with(client, stack, headers).await.status().as_u16());
    }
    statuses
}

#[tokio::test]
async fn untrusted_peers_cannot_choose_their_address() {
    let stack = Stack::start(StackOptions::default()).await;
    let peer = client_from([127, 0, 40, 1]);
    let a = [("x-forwarded-for", "203.0.113.10")];
    let b = [("x-forwarded-for", "203.0.113.20")];

    assert_eq!(
        statuses_with(&peer, &stack, &a, 4).await,
        [200, 200, 200, 429]
    );
    // B's claim is ignored too: both share the peer's one bucket.
    assert_eq!(statuses_with(&peer, &stack, &b, 1).await, [429]);

    let forwarded: Vec<_> = stack
        .upstream
        .requests()
        .iter()
        .map(|seen| seen.headers["x-forwarded-for"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(forwarded, ["127.0.40.1"; 3]);
    assert!(stack.metric("gateway_forwarding_ignored_total").await >= 5.0);
}

#[tokio::test]
async fn trusted_proxy_chains_name_the_client() {
    let config = shipped_with(&[(
        "trusted_proxies = []",
        "trusted_proxies = [\"127.0.41.0/24\"]",
    )]);
    let stack = Stack::start(StackOptions {
        gateway_config: Some(config),
        ..Default::default()
    })
    .await;
    let balancer = client_from([127, 0, 41, 5]);

    // Client A behind the balancer.
    let a = [("x-forwarded-for", "203.0.113.10")];
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let response = post_with(&balancer, &stack, &a).await;
        remaining.push((
            response.status().as_u16(),
            header_values(&response, "x-ratelimit-remaining")[0].to_owned(),
        ));
        if response.status() == 429 {
            assert_eq!(header_values(&response, "retry-after"), ["86400"]);
        }
    }
    let expected = [(200, "2"), (200, "1"), (200, "0"), (429, "0")];
    assert_eq!(
        remaining,
        expected.map(|(status, left)| (status, left.to_owned()))
    );

    // Client B through the same balancer has its own budget.
    let b = post_with(&balancer, &stack, &[("x-forwarded-for", "203.0.113.20")]).await;
    assert_eq!(b.status(), 200);
    assert_eq!(
        header_values(&b, "ratelimit"),
        ["\"anonymous-generate\";r=2;t=86400"]
    );

    // The balancer's probes count nothing, and its own requests are keyed on its address.
    for _ in 0..5 {
        let probe = balancer.get(stack.url("/healthz")).send().await.unwrap();
        assert_eq!(probe.status(), 200);
        assert!(header_values(&probe, "x-ratelimit-remaining").is_empty());
    }
    let own = post_with(&balancer, &stack, &[]).await;
    assert_eq!(header_values(&own, "x-ratelimit-remaining"), ["2"]);

    // A trusted peer with no or an empty header is keyed on its own address, never shared.
    let other = client_from([127, 0, 41, 6]);
    let mut sequence = statuses_with(&other, &stack, &[], 2).await;
    sequence.extend(statuses_with(&other, &stack, &[("x-forwarded-for", "")], 2).await);
    assert_eq!(sequence, [200, 200, 200, 429]);
    let third = post_with(&client_from([127, 0, 41, 7]), &stack, &[]).await;
    assert_eq!(header_values(&third, "x-ratelimit-remaining"), ["2"]);

    // The app sees the resolved client, not the chain the client could have forged.
    let spoofed = [("x-forwarded-for", "6.6.6.6, 198.51.100.9")];
    post_with(&balancer, &stack, &spoofed).await;
    let last = stack.upstream.requests().pop().unwrap();
    assert_eq!(last.headers["x-forwarded-for"], "198.51.100.9");
}

#[tokio::test]
async fn rfc_7239_forwarded_is_honoured_from_trusted_proxies() {
    let config = shipped_with(&[
        ("trusted_proxies = []", "trusted_proxies = [\"127.0.42.1\"]"),
        (
            "forwarded_header = \"x-forwarded-for\"",
            "forwarded_header = \"forwarded\"",
        ),
    ]);
    let stack = Stack::start(StackOptions {
        gateway_config: Some(config),
        ..Default::default()
    })
    .await;
    let proxy = client_from([127, 0, 42, 1]);
    let c = [("forwarded", "for=192.0.2.60;proto=https")];
    let d = [("forwarded", "for=\"[2001:db8::17]:4711\"")];
    assert_eq!(
        statuses_with(&proxy, &stack, &c, 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(statuses_with(&proxy, &stack, &d, 1).await, [200]);
}

/// Adds an address to the loopback interface (this needs root, as CI and the dev machines are).
fn add_loopback_address(address: &str) {
    let output = std::process::Command::new("ip")
        .args(["-6", "addr", "add", &format!("{address}/128"), "dev", "lo"])
        .output()
        .expect("the ip command is available");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success()
            || stderr.contains("File exists")
            || stderr.contains("already assigned"),
        "ip addr add: {stderr}"
    );
}

#[tokio::test]
async fn ipv6_clients_in_one_64_share_a_budget() {
    let addresses = [
        "2001:db8:1:2::10",
        "2001:db8:1:2:ffff::11",
        "2001:db8:1:3::10",
    ];
    for address in addresses {
        add_loopback_address(address);
    }
    let port = common::free_port();
    let listen: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let options = StackOptions {
        gateway_listen: Some(listen),
        ..Default::default()
    };
    let stack = Stack::start(options).await;
    let from = |address: &str| {
        Client::builder()
            .local_address(address.parse::<IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let url = stack.url("/api/v1/generate");

    assert_eq!(statuses(&from(addresses[0]), &url, 2).await, [200, 200]);
    // Another address in the same /64 continues the same budget.
    assert_eq!(statuses(&from(addresses[1]), &url, 2).await, [200, 429]);
    // The neighbouring /64 is another client.
    assert_eq!(statuses(&from(addresses[2]), &url, 1).await, [200]);
}

/// The shipped configuration with each `(from, to)` replacement made exactly once.
fn shipped_with(replacements: &[(&str, &str)]) -> String {
    let mut text =
        std::fs::read_to_string(common::repo_root().join("config/gateway.toml")).unwrap();
    for (from, to) in replacements {
        assert!(text.contains(from), "the shipped file has {from:?}");
        text = text.replacen(from, to, 1);
    }
    text
}

fn fingerprint_config(header: &str) -> String {
    let shipped = std::fs::read_to_string(common::repo_root().join("config/gateway.toml")).unwrap();
    let limited = shipped.replace("quantity = 3\n", "quantity = 5\nfingerprint_quantity = 3\n");
    let line = "# fingerprint_header = \"X-Fingerprint\"";
    assert!(
        limited.contains(line),
        "the shipped file shows the fingerprint key commented out"
    );
    limited.replace(line, &format!("fingerprint_header = \"{header}\""))
}

#[tokio::test]
async fn fingerprints_split_an_address_budget_but_never_extend_it() {
    let options = StackOptions {
        gateway_config: Some(fingerprint_config("X-Fingerprint")),
        ..Default::default()
    };
    let stack = Stack::start(options).await;
    let peer = client_from([127, 0, 43, 10]);
    let fp = |value: &'static str| [("x-fingerprint", value)];

    // One fingerprint gets its share: the fingerprint limit is the most restrictive.
    let mut remaining = Vec::new();
    for _ in 0..4 {
        let response = post_with(&peer, &stack, &fp("fpA")).await;
        remaining.push((
            response.status().as_u16(),
            header_values(&response, "x-ratelimit-remaining")[0].to_owned(),
        ));
    }
    let expected = [(200, "2"), (200, "1"), (200, "0"), (429, "0")];
    assert_eq!(
        remaining,
        expected.map(|(status, left)| (status, left.to_owned()))
    );

    // Rotating fingerprints reaches the address ceiling of 5, and no further.
    let b = post_with(&peer, &stack, &fp("fpB")).await;
    assert_eq!(b.status(), 200);
    assert_eq!(header_values(&b, "x-ratelimit-limit"), ["5"]);
    assert_eq!(header_values(&b, "x-ratelimit-remaining"), ["1"]);
    let members = header_values(&b, "ratelimit")[0];
    assert!(
        members.contains("\"anonymous-generate-per-fingerprint\";r=2;"),
        "{members}"
    );
    assert!(members.contains("\"anonymous-generate\";r=1;"), "{members}");
    let c = post_with(&peer, &stack, &fp("fpC")).await;
    assert_eq!(
        (
            c.status().as_u16(),
            header_values(&c, "x-ratelimit-remaining")[0]
        ),
        (200, "0")
    );
    let d = post_with(&peer, &stack, &fp("fpD")).await;
    assert_eq!(d.status(), 429);
    assert_eq!(header_values(&d, "retry-after"), ["86400"]);
    let body: serde_json::Value = d.json().await.unwrap();
    assert_eq!(body["limit"], "anonymous-generate");

    // Another address with the same fingerprint neither shares nor drains it.
    let elsewhere = post_with(&client_from([127, 0, 43, 11]), &stack, &fp("fpA")).await;
    assert_eq!(elsewhere.status(), 200);
    assert!(header_values(&elsewhere, "ratelimit")[0].contains("per-fingerprint\";r=2;"));

    // No, empty or blank fingerprints are the address's own share, never a shared bucket.
    let bare = client_from([127, 0, 43, 30]);
    assert_eq!(
        statuses_with(&bare, &stack, &[], 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(statuses_with(&bare, &stack, &fp(""), 1).await, [429]);
    assert_eq!(statuses_with(&bare, &stack, &fp("   "), 1).await, [429]);
    let fresh = post_with(&client_from([127, 0, 43, 31]), &stack, &[]).await;
    assert_eq!(header_values(&fresh, "x-ratelimit-remaining"), ["2"]);

    // A huge fingerprint is hashed, not a 5xx.
    let huge = "f".repeat(10_000);
    let response = post_with(
        &client_from([127, 0, 43, 60]),
        &stack,
        &[("x-fingerprint", &huge)],
    )
    .await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn only_the_configured_fingerprint_header_counts() {
    let options = StackOptions {
        gateway_config: Some(fingerprint_config("X-Device-Id")),
        ..Default::default()
    };
    let stack = Stack::start(options).await;

    // X-Fingerprint is not the configured header: rotating it buys nothing.
    let rotating = client_from([127, 0, 44, 50]);
    let mut sequence = Vec::new();
    for n in 0..6 {
        let value = format!("fp{n}");
        sequence.push(
            post_with(&rotating, &stack, &[("x-fingerprint", &value)])
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(sequence, [200, 200, 200, 429, 429, 429]);

    let device = client_from([127, 0, 44, 51]);
    assert_eq!(
        statuses_with(&device, &stack, &[("x-device-id", "d1")], 4).await,
        [200, 200, 200, 429]
    );
    assert_eq!(
        statuses_with(&device, &stack, &[("x-device-id", "d2")], 1).await,
        [200]
    );
}

#[tokio::test]
async fn fingerprints_are_ignored_when_off() {
    let stack = Stack::start(StackOptions::default()).await;
    let peer = client_from([127, 0, 45, 40]);
    let mut sequence = Vec::new();
    for value in ["fp1", "fp2", "fp3", "fp4"] {
        sequence.push(
            post_with(&peer, &stack, &[("x-fingerprint", value)])
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(sequence, [200, 200, 200, 429]);
}

#[tokio::test]
async fn bearer_variants_cannot_open_buckets_or_skip_limits() {
    let stack = Stack::start(StackOptions::default()).await;
    let token = token_for("42");

    // Junk tokens share the address's single bucket; a valid token then still passes.
    let junk = client_from([127, 0, 46, 2]);
    let mut sequence = Vec::new();
    for n in 1..=5 {
        let value = format!("Bearer junk-{n}");
        sequence.push(
            post_with(&junk, &stack, &[("authorization", &value)])
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(sequence, [200, 200, 200, 429, 429]);
    assert_eq!(statuses_with(&junk, &stack, &[], 1).await, [429]);
    let valid = format!("Bearer {token}");
    assert_eq!(
        statuses_with(&junk, &stack, &[("authorization", &valid)], 1).await,
        [200]
    );

    // The scheme is case-insensitive; any other shape is anonymous.
    let variants = client_from([127, 0, 46, 4]);
    let lower = format!("bearer {token}");
    let lower = post_with(&variants, &stack, &[("authorization", &lower)]).await;
    assert_eq!(lower.status(), 200);
    assert!(header_values(&lower, "x-ratelimit-remaining").is_empty());
    let shapes = [
        format!("X Bearer {token}"),
        token.clone(),
        format!("Bearer {token} extra"),
        "Basic dXNlcjpwYXNz".to_owned(),
    ];
    let mut sequence = Vec::new();
    for value in &shapes {
        sequence.push(
            post_with(&variants, &stack, &[("authorization", value)])
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(sequence, [200, 200, 200, 429]);

    // A hundred different invalid tokens from one peer: exactly three admitted.
    let many = client_from([127, 0, 46, 6]);
    let mut admitted = 0;
    for n in 0..100 {
        let value = format!("Bearer invalid.{n}.token");
        if post_with(&many, &stack, &[("authorization", &value)])
            .await
            .status()
            == 200
        {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
}

#[tokio::test]
async fn invalid_tokens_get_401_when_configured_to_reject() {
    let shipped = std::fs::read_to_string(common::repo_root().join("config/gateway.toml")).unwrap();
    let config = shipped.replace(
        "invalid_token = \"anonymous\"",
        "invalid_token = \"reject\"",
    );
    let stack = Stack::start(StackOptions {
        gateway_config: Some(config),
        ..Default::default()
    })
    .await;
    let peer = client_from([127, 0, 47, 7]);
    for n in 1..=5 {
        let value = format!("Bearer junk-{n}");
        let response = post_with(&peer, &stack, &[("authorization", &value)]).await;
        assert_eq!(response.status(), 401);
        assert!(header_values(&response, "www-authenticate")[0].starts_with("Bearer"));
    }
    assert_eq!(stack.upstream.count("/api/v1/generate"), 0);
    // No bucket was touched: the peer still has its whole budget.
    let bare = post_with(&peer, &stack, &[]).await;
    assert_eq!(header_values(&bare, "x-ratelimit-remaining"), ["2"]);
}

#[tokio::test]
async fn authenticated_limits_follow_the_user_across_addresses() {
    let extra = r#"
[[limits]]
name = "user-generate"
methods = ["POST"]
path = "/api/v1/generate"
applies_to = "authenticated"
quantity = 2
window_secs = 3600
"#;
    let options = StackOptions {
        gateway_config: Some(shipped_config_with(extra)),
        ..Default::default()
    };
    let stack = Stack::start(options).await;
    let auth = format!("Bearer {}", token_for("7"));
    let header = [("authorization", auth.as_str())];
    let first = post_with(&client_from([127, 0, 48, 1]), &stack, &header).await;
    assert_eq!(
        header_values(&first, "ratelimit"),
        ["\"user-generate\";r=1;t=3600"]
    );
    let second = post_with(&client_from([127, 0, 48, 2]), &stack, &header).await;
    assert_eq!(second.status(), 200);
    let third = post_with(&client_from([127, 0, 48, 3]), &stack, &header).await;
    assert_eq!(third.status(), 429);
}
