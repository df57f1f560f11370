//! A real server (in this process, on loopback) over a real store, and
//! helpers to drive it as users and hosts do.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use podvisor_api::{Client, Container, Host, HostCapacity, Pod, Quantity, ResourceList};
use podvisor_server::{Role, RunningServer, ServerConfig};

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub store_url: Option<String>,
    pub admin_token: String,
    pub admin: Client,
}

impl TestServer {
    /// A server on SQLite in a temp dir, with short leases.
    pub async fn sqlite() -> TestServer {
        TestServer::start(None, |_| {}).await
    }

    /// A server with `store_url` (None: SQLite), config changed by `tune`.
    pub async fn start(
        store_url: Option<String>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new("127.0.0.1:0", &dir.path().join("state"));
        config.store_url = store_url.clone();
        config.host_ttl = Duration::from_secs(2);
        config.leader_ttl = Duration::from_secs(2);
        tune(&mut config);
        let server = podvisor_server::start(config).await.unwrap();
        let admin_token = std::fs::read_to_string(server.admin_token_path())
            .unwrap()
            .trim()
            .to_string();
        let admin = Client::new(&server.url(), Some(&admin_token)).unwrap();
        TestServer {
            server,
            dir,
            store_url,
            admin_token,
            admin,
        }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    /// A client with a new token of `role`/`name`.
    pub async fn client(&self, role: Role, name: &str) -> Client {
        let token = self.token_of(role, name).await;
        Client::new(&self.url(), Some(&token)).unwrap()
    }

    /// A new token of `role`/`name`.
    pub async fn token_of(&self, role: Role, name: &str) -> String {
        podvisor_server::create_token(&self.state_dir(), self.store_url.as_deref(), role, name)
            .await
            .unwrap()
    }

    /// Registers host `name` with `cpu` millicores and `memory` bytes, and
    /// returns its client.
    pub async fn host(&self, name: &str, cpu: u64, memory: u64) -> Client {
        self.host_with_storage(name, cpu, memory, None).await
    }

    /// As [`TestServer::host`], its volume directory on the shared
    /// storage `storage`.
    pub async fn host_with_storage(
        &self,
        name: &str,
        cpu: u64,
        memory: u64,
        storage: Option<&str>,
    ) -> Client {
        let client = self.client(Role::Host, name).await;
        let mut host = Host::new(name, HostCapacity { cpu, memory }, "http://127.0.0.1:9");
        host.spec.volume_storage = storage.map(str::to_string);
        client
            .register_host(&host, "test-host-endpoint-secret-0123456789")
            .await
            .unwrap();
        client
    }
}

/// A pod with one busybox container of `cpu`/`memory` limits.
pub fn pod(name: &str, cpu: &str, memory: &str) -> Pod {
    let mut c = Container {
        name: "main".into(),
        image: "registry.local/busybox:1".into(),
        ..Default::default()
    };
    c.resources.limits = Some(ResourceList {
        cpu: Some(Quantity::new(cpu)),
        memory: Some(Quantity::new(memory)),
    });
    Pod::new(name, vec![c])
}

/// Polls `check` until it returns Some, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until pod `default/name` satisfies `check` and returns it.
pub async fn pod_where(
    client: &Client,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    eventually(20, what, || async {
        let pod = client.get_pod("default", name).await.ok()?;
        check(&pod).then_some(pod)
    })
    .await
}
