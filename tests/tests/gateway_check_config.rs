//! `gateway check-config`: validates without starting a server.

mod common;

use std::process::Command;

use common::{binary, repo_root};

#[test]
fn shipped_configuration_passes() {
    let output = Command::new(binary("gateway"))
        .arg("check-config")
        .arg(repo_root().join("config/gateway.toml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn broken_configuration_fails_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo_root().join("config/gateway.toml")).unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        shipped.replace("quantity = 3", "quantity = \"three\""),
    )
    .unwrap();

    let output = Command::new(binary("gateway"))
        .arg("check-config")
        .arg(&broken)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line ") && stderr.contains("column "),
        "{stderr}"
    );
}
