//! Live reloading, end to end: good files apply within seconds, bad files change nothing, and
//! the ways operators replace files (in place, `mv`, symlink swaps, SIGHUP) all work.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{client_from, header_values, repo_root, statuses, Stack, StackOptions};

const GENERATION: &str = "gateway_config_generation";
const FAILED: &str = "gateway_config_reloads_total{result=\"failed\"}";

fn shipped() -> String {
    std::fs::read_to_string(repo_root().join("config/gateway.toml")).unwrap()
}

fn with_quantity(quantity: u32) -> String {
    shipped().replace("quantity = 3\n", &format!("quantity = {quantity}\n"))
}

/// Writes `text` to a sibling file and renames it over `path`, as editors and deploy tools do.
fn replace_atomically(path: &Path, text: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

async fn limit_seen_by_fresh_client(stack: &Stack, last_octet: u8) -> String {
    let response = client_from([127, 0, 60, last_octet])
        .post(stack.url("/api/v1/generate"))
        .send()
        .await
        .unwrap();
    header_values(&response, "x-ratelimit-limit")[0].to_owned()
}

/// Waits up to `within` for the generation metric to reach `generation`.
async fn wait_for_generation(stack: &Stack, generation: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while stack.metric(GENERATION).await < generation {
        assert!(
            Instant::now() < deadline,
            "generation {generation} not reached in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn bad_files_are_rejected_and_good_ones_applied() {
    let stack = Stack::start(StackOptions {
        gateway_config: Some(shipped()),
        ..Default::default()
    })
    .await;
    let limited = client_from([127, 0, 61, 10]);
    let url = stack.url("/api/v1/generate");
    assert_eq!(statuses(&limited, &url, 4).await, [200, 200, 200, 429]);

    let bad_files = [
        shipped().replace("quantity = 3\n", "quantity =\n"),
        shipped().replace("quantity = 3\n", "quantity = \"three\"\n"),
        shipped().replace("quantity = 3\n", "quantity = -1\n"),
        shipped().replace("window_secs = 86400", "window_secs = 0"),
        shipped().replace("window_secs = 86400", "windowsecs = 86400"),
        String::new(),
    ];
    let mut octet = 100;
    for (n, bad) in bad_files.iter().enumerate() {
        std::fs::write(&stack.config_path, bad).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while stack.metric(FAILED).await < (n + 1) as f64 {
            assert!(Instant::now() < deadline, "bad file {n} was not noticed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(stack.metric(GENERATION).await, 1.0);
        assert_eq!(statuses(&limited, &url, 1).await, [429]);
        octet += 1;
        assert_eq!(limit_seen_by_fresh_client(&stack, octet).await, "3");
        let health = reqwest::get(stack.admin_url("/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
    }

    // A valid file moved over the old one applies within 2 s; counters survive.
    replace_atomically(&stack.config_path, &with_quantity(5));
    wait_for_generation(&stack, 2.0, Duration::from_secs(2)).await;
    assert_eq!(limit_seen_by_fresh_client(&stack, 200).await, "5");
    let limited_now = limited.post(&url).send().await.unwrap();
    assert_eq!(header_values(&limited_now, "x-ratelimit-remaining"), ["1"]);

    // Editor leftovers beside the file are never read.
    let dir = stack.config_path.parent().unwrap();
    std::fs::write(dir.join(".gateway.toml.swp"), "garbage =").unwrap();
    std::fs::write(dir.join("gateway.toml~"), "garbage =").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(stack.metric(FAILED).await, bad_files.len() as f64);
    assert_eq!(stack.metric(GENERATION).await, 2.0);
}

#[tokio::test]
async fn symlink_swaps_are_picked_up() {
    // The Kubernetes ConfigMap layout: gateway.toml -> ..data/gateway.toml, ..data -> v1.
    let dir = tempfile::tempdir().unwrap();
    for (version, quantity) in [("v1", 3), ("v2", 7)] {
        std::fs::create_dir(dir.path().join(version)).unwrap();
        std::fs::write(
            dir.path().join(version).join("gateway.toml"),
            with_quantity(quantity),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("v1", dir.path().join("..data")).unwrap();
    let config = dir.path().join("gateway.toml");
    std::os::unix::fs::symlink("..data/gateway.toml", &config).unwrap();

    let stack = Stack::start(StackOptions {
        gateway_config: Some(shipped()),
        ..Default::default()
    })
    .await;
    // Point the running gateway's file at the symlinked layout.
    std::fs::remove_file(&stack.config_path).unwrap();
    std::os::unix::fs::symlink(&config, &stack.config_path).unwrap();
    wait_for_generation(&stack, 2.0, Duration::from_secs(2)).await;
    assert_eq!(limit_seen_by_fresh_client(&stack, 1).await, "3");

    std::os::unix::fs::symlink("v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    wait_for_generation(&stack, 3.0, Duration::from_secs(2)).await;
    assert_eq!(limit_seen_by_fresh_client(&stack, 2).await, "7");
}

#[tokio::test]
async fn sighup_reloads_and_still_rejects_bad_files() {
    let stack = Stack::start(StackOptions {
        gateway_config: Some(shipped()),
        ..Default::default()
    })
    .await;
    let hup = |pid: u32| {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
        assert!(status.unwrap().success());
    };

    std::fs::write(&stack.config_path, with_quantity(4)).unwrap();
    hup(stack.gateway_pid());
    wait_for_generation(&stack, 2.0, Duration::from_secs(2)).await;
    assert_eq!(limit_seen_by_fresh_client(&stack, 30).await, "4");

    let failed_before = stack.metric(FAILED).await;
    std::fs::write(&stack.config_path, "quantity =").unwrap();
    hup(stack.gateway_pid());
    let deadline = Instant::now() + Duration::from_secs(2);
    while stack.metric(FAILED).await <= failed_before {
        assert!(
            Instant::now() < deadline,
            "invalid file after SIGHUP was not rejected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(limit_seen_by_fresh_client(&stack, 31).await, "4");
}

#[tokio::test]
async fn reload_under_load_changes_the_limit_without_failures() {
    let stack = Stack::start(StackOptions {
        gateway_config: Some(shipped()),
        ..Default::default()
    })
    .await;
    let url = stack.url("/api/v1/generate");
    let load = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..300u32 {
                let client = client_from([127, 0, 62, (n % 250) as u8 + 1]);
                statuses.push(client.post(&url).send().await.unwrap().status().as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    replace_atomically(&stack.config_path, &with_quantity(9));
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|status| [200, 429].contains(status)),
        "{statuses:?}"
    );
    wait_for_generation(&stack, 2.0, Duration::from_secs(2)).await;
    assert_eq!(limit_seen_by_fresh_client(&stack, 250).await, "9");
}
