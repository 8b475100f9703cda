//! Route-level behaviour end to end: CORS on refusals, preflights, several limits on one route,
//! shadow mode, cost, fixed windows, and the size and time ceilings on requests.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{
    client_from, header_values, ignored_event, post_signed, repo_root, shipped_config_with,
    statuses, unix_now, Stack, StackOptions,
};

fn shipped() -> String {
    std::fs::read_to_string(repo_root().join("config/gateway.toml")).unwrap()
}

async fn stack_with(config: String) -> Stack {
    Stack::start(StackOptions {
        gateway_config: Some(config),
        ..Default::default()
    })
    .await
}

const CORS: &str = r#"
[routes.cors]
allow_origins = ["https://app.example.com"]
allow_methods = ["POST", "OPTIONS"]
allow_headers = ["content-type", "authorization"]
expose_headers = [
    "retry-after", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset",
    "ratelimit", "ratelimit-policy",
]
"#;

#[tokio::test]
async fn preflights_are_free_and_refusals_keep_cors_headers() {
    let config = shipped().replace(
        "upstream = \"app\"\n",
        &format!("upstream = \"app\"\n{CORS}"),
    );
    let stack = stack_with(config).await;
    let browser = client_from([127, 0, 50, 10]);
    let origin = "https://app.example.com";

    let mut posts = Vec::new();
    for _ in 0..10 {
        let preflight = browser
            .request(reqwest::Method::OPTIONS, stack.url("/api/v1/generate"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
            .await
            .unwrap();
        assert!(preflight.status().is_success(), "{}", preflight.status());
        assert_eq!(
            header_values(&preflight, "access-control-allow-origin"),
            [origin]
        );

        let post = browser
            .post(stack.url("/api/v1/generate"))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        posts.push(post.status().as_u16());
        assert_eq!(
            header_values(&post, "access-control-allow-origin"),
            [origin]
        );
        if post.status() == 429 {
            assert!(header_values(&post, "vary").contains(&"Origin"));
            let exposed = header_values(&post, "access-control-expose-headers")[0];
            assert!(
                exposed.contains("retry-after") && exposed.contains("ratelimit"),
                "{exposed}"
            );
        }
    }
    assert_eq!(posts, [200, 200, 200, 429, 429, 429, 429, 429, 429, 429]);

    let evil = browser
        .post(stack.url("/api/v1/generate"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 429);
    assert!(header_values(&evil, "access-control-allow-origin").is_empty());
    // The answer still depends on Origin, so caches must keep them apart.
    assert_eq!(header_values(&evil, "vary"), ["Origin"]);
}

#[tokio::test]
async fn plain_options_is_counted_and_health_lookalikes_are_not_exempt() {
    let extra = r#"
[[limits]]
name = "everything"
path_prefix = "/test/"
applies_to = "everyone"
quantity = 3
window_secs = 60

[[limits]]
name = "healthz-lookalike"
path = "/healthzX"
applies_to = "everyone"
quantity = 1
window_secs = 60
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 51, 1]);
    let mut sequence = Vec::new();
    for _ in 0..4 {
        let response = client
            .request(reqwest::Method::OPTIONS, stack.url("/test/x"))
            .send()
            .await
            .unwrap();
        sequence.push(response.status().as_u16());
    }
    assert_eq!(sequence, [200, 200, 200, 429]);

    let lookalike = client.get(stack.url("/healthzX")).send().await.unwrap();
    assert_eq!(header_values(&lookalike, "x-ratelimit-remaining"), ["0"]);
    let dotted = statuses(&client, &stack.url("/healthz/../api/v1/generate"), 4).await;
    assert_eq!(dotted, [200, 200, 200, 429]);
}

#[tokio::test]
async fn head_refusals_have_headers_and_no_body() {
    let extra = r#"
[[limits]]
name = "reads"
methods = ["GET", "HEAD"]
path = "/test/read"
applies_to = "everyone"
quantity = 1
window_secs = 60
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 52, 1]);
    assert_eq!(
        client
            .get(stack.url("/test/read"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let head = client.head(stack.url("/test/read")).send().await.unwrap();
    assert_eq!(head.status(), 429);
    assert_eq!(header_values(&head, "retry-after"), ["60"]);
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_burst_on_two_limits_admits_exactly_one() {
    let extra = r#"
[[limits]]
name = "short"
path = "/test/burst"
applies_to = "everyone"
quantity = 1
window_secs = 2

[[limits]]
name = "long"
path = "/test/burst"
applies_to = "everyone"
quantity = 3
window_secs = 10
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 53, 1]);
    let url = stack.url("/test/burst");
    let requests = (0..10).map(|_| client.post(&url).send());
    let responses: Vec<_> = futures_util::future::join_all(requests)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let admitted = responses
        .iter()
        .filter(|response| response.status() == 200)
        .count();
    assert_eq!(admitted, 1);
    for refused in responses.iter().filter(|response| response.status() == 429) {
        let wait: u64 = header_values(refused, "retry-after")[0].parse().unwrap();
        assert!((1..=2).contains(&wait), "retry-after {wait}");
        // The refused burst consumed nothing from "long".
        assert!(header_values(refused, "ratelimit")[0].contains("\"long\";r=2;"));
    }
}

#[tokio::test]
async fn shadow_limits_measure_without_refusing() {
    let config = shipped().replace(
        "algorithm = \"sliding_window\"",
        "algorithm = \"sliding_window\"\nmode = \"shadow\"",
    );
    let stack = stack_with(config).await;
    let client = client_from([127, 0, 54, 1]);
    for _ in 0..5 {
        let response = client
            .post(stack.url("/api/v1/generate"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // The gateway adds nothing for a shadow limit; the app's own header passes untouched.
        assert_eq!(header_values(&response, "x-ratelimit-limit"), ["999"]);
        assert!(header_values(&response, "ratelimit").is_empty());
    }
    let refused =
        "gateway_limit_decisions_total{limit=\"anonymous-generate\",outcome=\"shadow_refused\"}";
    assert_eq!(stack.metric(refused).await, 2.0);
}

#[tokio::test]
async fn route_cost_is_charged_to_every_limit() {
    let extra = r#"
[[routes]]
name = "expensive"
path_prefix = "/test/expensive"
upstream = "app"
cost = 2

[[limits]]
name = "budget"
path_prefix = "/test/"
applies_to = "everyone"
quantity = 3
window_secs = 60
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 55, 1]);
    let first = client
        .post(stack.url("/test/expensive"))
        .send()
        .await
        .unwrap();
    assert_eq!(header_values(&first, "x-ratelimit-remaining"), ["1"]);
    let second = client
        .post(stack.url("/test/expensive"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    let cheap = client.post(stack.url("/test/cheap")).send().await.unwrap();
    assert_eq!(header_values(&cheap, "x-ratelimit-remaining"), ["0"]);
}

#[tokio::test]
async fn fixed_day_window_resets_at_utc_midnight_in_any_time_zone() {
    let config = shipped().replace(
        "algorithm = \"sliding_window\"",
        "algorithm = \"fixed_window\"",
    );
    let options = StackOptions {
        gateway_config: Some(config),
        env: vec![("TZ".into(), "America/Los_Angeles".into())],
        ..Default::default()
    };
    let stack = Stack::start(options).await;
    let response = client_from([127, 0, 56, 1])
        .post(stack.url("/api/v1/generate"))
        .send()
        .await
        .unwrap();
    let reset: u64 = header_values(&response, "x-ratelimit-reset")[0]
        .parse()
        .unwrap();
    let expected = 86_400 - unix_now() % 86_400;
    assert!(
        reset.abs_diff(expected) <= 1,
        "reset {reset}, expected {expected}"
    );
}

#[tokio::test]
async fn webhooks_count_nothing_while_everything_else_is_counted() {
    let extra = r#"
[[limits]]
name = "catch-all"
path_prefix = "/"
applies_to = "everyone"
quantity = 10
window_secs = 86400
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let stripe = client_from([127, 0, 57, 7]);
    for n in 0..50 {
        let event = ignored_event(&format!("evt_catch_all_{n}"));
        let response = post_signed(&stripe, &stack, "/api/v1/stripe/webhook", event).await;
        assert_eq!(response.status(), 200);
        assert!(header_values(&response, "ratelimit").is_empty());
    }

    let generate = stripe
        .post(stack.url("/api/v1/generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(header_values(&generate, "x-ratelimit-remaining"), ["2"]);
    assert_eq!(
        header_values(&generate, "ratelimit"),
        ["\"anonymous-generate\";r=2;t=86400, \"catch-all\";r=9;t=86400"]
    );

    let mut catch_all = Vec::new();
    for (method, path) in [
        (reqwest::Method::POST, "/api/v1/stripe/webhookX"),
        (reqwest::Method::GET, "/api/v1/stripe/webhook"),
        (
            reqwest::Method::POST,
            "/api/v1/stripe/webhook%2F..%2F..%2Fgenerate",
        ),
    ] {
        let response = stripe
            .request(method, stack.url(path))
            .send()
            .await
            .unwrap();
        assert!(
            [404, 405].contains(&response.status().as_u16()),
            "{path}: {}",
            response.status()
        );
        catch_all.push(header_values(&response, "ratelimit")[0].to_owned());
    }
    assert!(catch_all[2].contains("\"catch-all\";r=6;"), "{catch_all:?}");
    let sneaky = stripe
        .post(stack.url("/api/v1/stripe/webhook/../../generate"))
        .send()
        .await
        .unwrap();
    assert_eq!(header_values(&sneaky, "x-ratelimit-remaining"), ["1"]);
    assert!(header_values(&sneaky, "ratelimit")[0].contains("\"catch-all\";r=5;"));

    // A query string does not change the route: the webhook still reaches billing.
    let event = ignored_event("evt_catch_all_query");
    let query = post_signed(&stripe, &stack, "/api/v1/stripe/webhook?x=1", event).await;
    assert_eq!(query.status(), 200);
    assert_eq!(stack.upstream.count("/api/v1/stripe/webhook"), 0);
}

#[tokio::test]
async fn oversized_heads_and_bodies_are_refused() {
    let extra = r#"
[[routes]]
name = "small"
path_prefix = "/test/small"
upstream = "app"
max_body_bytes = 1024
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 58, 1]);

    let big = client
        .post(stack.url("/test/small"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    let chunks =
        futures_util::stream::iter([vec![b'y'; 600], vec![b'y'; 600]].map(Ok::<_, std::io::Error>));
    let chunked = client
        .post(stack.url("/test/small"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    assert!(chunked.map_or(true, |response| response.status() == 413));
    assert_eq!(stack.upstream.count("/test/small"), 0);
    let fits = client
        .post(stack.url("/test/small"))
        .body(vec![b'z'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(fits.status(), 200);

    let long = "v".repeat(20_000);
    let heavy = client
        .get(stack.url("/about"))
        .header("x-padding", long)
        .send()
        .await
        .unwrap();
    assert_eq!(heavy.status(), 431);

    let huge = client
        .post(stack.url("/api/v1/stripe/webhook"))
        .header("content-length", "10737418240")
        .body(vec![b'a'; 1024])
        .send()
        .await;
    assert!(huge.map_or(true, |response| response.status() == 413));
}

#[tokio::test]
async fn slow_bodies_are_cut_off() {
    let config = shipped().replace("body_read_timeout_secs = 10", "body_read_timeout_secs = 1");
    let stack = stack_with(config).await;
    let address = stack.gateway;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head = "POST /api/v1/stripe/webhook HTTP/1.1\r\nHost: t\r\nContent-Length: 305\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        for _ in 0..4 {
            if stream.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1500));
        }
        let _ = stream.read_to_end(&mut answer);
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    })
    .await
    .unwrap();
    let (elapsed, answer) = outcome;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(elapsed < Duration::from_secs(8), "{elapsed:?}");
}

#[tokio::test]
async fn internal_apis_are_never_routed() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 59, 1]);
    for path in [
        "/internal/v1/tokens/debit",
        "/internal",
        "/api/../internal/v1/tokens/debit",
    ] {
        let response = client
            .post(stack.url(path))
            .header("authorization", "Bearer anything")
            .body(r#"{"user_id":"42","amount":1,"idempotency_key":"k"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    assert!(stack.upstream.requests().is_empty());
}

#[tokio::test]
async fn upstream_failures_still_report_the_limit() {
    let extra = r#"
[upstreams.down]
address = "127.0.0.1:9"

[[routes]]
name = "down"
path_prefix = "/test/down"
upstream = "down"

[[limits]]
name = "down-limit"
path_prefix = "/test/down"
applies_to = "everyone"
quantity = 2
window_secs = 60
"#;
    let stack = stack_with(shipped_config_with(extra)).await;
    let client = client_from([127, 0, 59, 2]);
    let failed = client.post(stack.url("/test/down")).send().await.unwrap();
    assert_eq!(failed.status(), 502);
    assert_eq!(
        header_values(&failed, "content-type"),
        ["application/problem+json"]
    );
    assert_eq!(header_values(&failed, "x-ratelimit-remaining"), ["1"]);
}

/// Writes `head` on a new connection, then `body` a byte every `pause`, and returns what the
/// gateway answered and when the answer began, measured from the head.
async fn send_slowly(
    stack: &Stack,
    head: &'static str,
    body: &'static [u8],
    pause: Duration,
) -> (String, Duration) {
    let gateway = stack.gateway;
    tokio::task::spawn_blocking(move || send_slowly_blocking(gateway, head, body, pause))
        .await
        .unwrap()
}

fn send_slowly_blocking(
    gateway: std::net::SocketAddr,
    head: &'static str,
    body: &'static [u8],
    pause: Duration,
) -> (String, Duration) {
    let mut stream = TcpStream::connect(gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    stream.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut answered_at = None;
    let mut unsent = body.iter();
    let mut chunk = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(15) {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => {
                answered_at.get_or_insert(started.elapsed());
                answer.extend_from_slice(&chunk[..read]);
                continue;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if let Some(byte) = unsent.next() {
            if stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(pause);
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    (text, answered_at.unwrap_or(started.elapsed()))
}

/// A stack whose visitor at 127.0.0.1 has used up the anonymous generation quota.
async fn stack_over_quota() -> Stack {
    let stack = Stack::start(StackOptions::default()).await;
    let client = reqwest::Client::new();
    let url = stack.url("/api/v1/generate");
    assert_eq!(statuses(&client, &url, 3).await, [200, 200, 200]);
    stack
}

#[tokio::test]
async fn a_refused_client_waiting_to_send_its_body_hears_no_at_once() {
    let stack = stack_over_quota().await;
    let head = "POST /api/v1/generate HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\
                Content-Length: 5000\r\n\r\n";
    // The body would only follow a 100 Continue, which must not come.
    let (answer, after) = send_slowly(&stack, head, b"", Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(after < Duration::from_secs(1), "answered after {after:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_refused_client_trickling_its_body_is_answered_and_let_go() {
    let stack = stack_over_quota().await;
    let head = "POST /api/v1/generate HTTP/1.1\r\nHost: t\r\nContent-Length: 60000\r\n\r\n";
    let (answer, after) = send_slowly(&stack, head, &[b'x'; 60], Duration::from_millis(300)).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(after < Duration::from_secs(3), "answered after {after:?}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_lower_case_method_meets_the_same_limits() {
    let stack = stack_over_quota().await;
    let head = "post /api/v1/generate HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\
                Connection: close\r\n\r\n";
    let (answer, _) = send_slowly(&stack, head, b"", Duration::ZERO).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
}

#[tokio::test]
async fn requests_the_gateway_cannot_pass_on_faithfully_are_refused() {
    let stack = Stack::start(StackOptions::default()).await;
    let cases: [(&'static str, &str); 4] = [
        ("GET /api/v1/anything HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            "POST /api/v1/generate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 501",
        ),
        (
            "POST /api/v1/generate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\
             Transfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 501",
        ),
    ];
    for (head, wanted) in cases {
        let (answer, _) = send_slowly(&stack, head, b"", Duration::ZERO).await;
        assert!(answer.starts_with(wanted), "{head:?} got {answer}");
        let closing = answer.to_ascii_lowercase().contains("connection: close");
        assert!(closing, "{head:?} got {answer}");
    }
    assert_eq!(stack.upstream.count("/api/v1/generate"), 0);
    assert_eq!(stack.upstream.count("/api/v1/anything"), 0);
}

#[tokio::test]
async fn a_body_that_trickles_past_the_whole_body_deadline_gets_408() {
    let config = shipped().replace(
        "body_read_timeout_secs = 10",
        "body_read_timeout_secs = 10\nbody_timeout_secs = 2",
    );
    let stack = stack_with(config).await;
    // Each byte comes well within the 10 s allowed between reads; the whole never arrives.
    let head = "POST /api/v1/stripe/webhook HTTP/1.1\r\nHost: t\r\nContent-Length: 305\r\n\r\n";
    let (answer, after) = send_slowly(&stack, head, &[b'x'; 30], Duration::from_millis(400)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        after < Duration::from_millis(3500),
        "answered after {after:?}"
    );
}
