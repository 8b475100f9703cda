//! `/metrics` is valid Prometheus text, as `promtool check metrics` judges it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{client_from, Stack, StackOptions};

#[tokio::test]
async fn metrics_pass_promtool() {
    let stack = Stack::start(StackOptions::default()).await;
    let client = client_from([127, 0, 70, 1]);
    for _ in 0..4 {
        client
            .post(stack.url("/api/v1/generate"))
            .send()
            .await
            .unwrap();
    }
    let text = reqwest::get(stack.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("gateway_requests_total"), "{text}");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package `prometheus`; .ci/run installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && report.trim().is_empty(),
        "promtool: {report}"
    );
}
