//! `podvisor host --runtime ack-without-vm`, the benchmark mode: pods are
//! reported Running and deleted at once, and nothing is started.

use std::time::Duration;

use podvisor_api::PodPhase;
use podvisor_testbed::daemon::{free_port, pids_mentioning};

use crate::fixture::*;

#[test]
fn ack_without_vm_acknowledges_pods_and_starts_nothing() {
    let s = Scratch::new();
    let server_dir = s.path().join("server").display().to_string();
    let admin = s
        .podvisor()
        .args(["server", "init", "--state-dir", &server_dir])
        .success()
        .stdout
        .trim()
        .to_string();
    let token = s
        .podvisor()
        .args([
            "server",
            "token",
            "create",
            "--host",
            "bench-1",
            "--state-dir",
            &server_dir,
        ])
        .success()
        .stdout
        .trim()
        .to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let _server = s.spawn(
        "server",
        &["server", "--listen", &listen, "--state-dir", &server_dir],
    );
    let url = format!("http://{listen}");
    let host_state = s.path().join("host").display().to_string();
    let mut host = s.spawn(
        "host",
        &[
            "host", "--server", &url, "--token", &token, "--name", "bench-1",
        ]
        .into_iter()
        .chain(["--state-dir", &host_state, "--runtime", "ack-without-vm"])
        .collect::<Vec<_>>(),
    );
    let cli = || {
        s.podvisor()
            .env("PODVISOR_SERVER", &url)
            .env("PODVISOR_TOKEN", &admin)
    };
    let yaml: Vec<String> = (0..5)
        .map(|i| {
            sleeper_yaml(
                &format!("p{i}"),
                "registry.invalid/nothing:1",
                "10m",
                "128Mi",
            )
        })
        .collect();
    wait_for("the host to register", Duration::from_secs(30), || {
        let out = cli().args(["get", "hosts"]).output();
        if out.stdout.contains("bench-1") {
            Ok(())
        } else {
            Err(format!("{out:?}\n{}", host.log()))
        }
    });
    cli()
        .args(["apply", "-f", "-"])
        .stdin(yaml.join("---\n"))
        .success();
    let names: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    let pods = wait_for("five acknowledged pods", Duration::from_secs(30), || {
        let pods = pods(cli())?;
        if all_running(&pods, &names) {
            Ok(pods)
        } else {
            Err(summary(&pods))
        }
    });
    assert!(pods.iter().all(|p| p.status.phase == PodPhase::Running));
    // Only the daemon itself mentions its state directory: no VM.
    assert_eq!(pids_mentioning(&host_state), [host.pid()]);
    let out = cli().args(["logs", "p0"]).output();
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("ack-without-vm"), "{}", out.stderr);
    for n in &names {
        cli()
            .args(["delete", "pod", n, "--wait", "--timeout", "30"])
            .success();
    }
    assert!(
        host.log().contains("nothing runs"),
        "the mode says what it is: {}",
        host.log()
    );
    assert_eq!(host.terminate(Duration::from_secs(10)), Some(0));
}
