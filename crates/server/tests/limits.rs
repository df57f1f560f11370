//! The server's limits, tried as an attacker would: names from the URL,
//! bodies too large or too deep, crowds of idle and slow connections.
//! A real server on loopback with its SQLite store.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, pod};
use podvisor_api::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The pods the store holds, in every namespace.
async fn stored_pods(ts: &TestServer) -> Vec<String> {
    let list: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/pods", ts.url()))
        .bearer_auth(&ts.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap(),
                p["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// The status code and Status message of an answer.
async fn status_of(resp: reqwest::Response) -> (u16, String) {
    let code = resp.status().as_u16();
    let status: Status = resp.json().await.unwrap();
    assert_eq!(status.code, code);
    (code, status.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_the_url_are_checked_before_anything_uses_them() {
    let ts = TestServer::sqlite().await;
    let http = reqwest::Client::new();
    let body = serde_json::to_string(&pod("web", "1", "64Mi")).unwrap();
    let send = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{}{path}", ts.url()))
            .bearer_auth(&ts.admin_token)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };

    let (code, msg) = status_of(
        send(
            reqwest::Method::POST,
            "/api/v1/namespaces/..%2F..%2Fetc/pods",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        msg.starts_with("the namespace in the URL: \"../../etc\" is not a valid name"),
        "{msg}"
    );

    let (code, msg) = status_of(
        send(
            reqwest::Method::PUT,
            "/api/v1/namespaces/default/pods/Web_1",
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        msg.starts_with("the pod name in the URL: \"Web_1\" is not a valid name"),
        "{msg}"
    );
    assert_eq!(stored_pods(&ts).await, Vec::<String>::new());

    // Every kind of route with names: reads, proxied actions, volumes,
    // hosts.
    for (method, path, what) in [
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/a.b/pods",
            "namespace",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/default/pods/web%2F..%2Fx/log",
            "pod name",
        ),
        (
            reqwest::Method::GET,
            "/api/v1/namespaces/default/pods/-web/exec",
            "pod name",
        ),
        (
            reqwest::Method::POST,
            "/api/v1/namespaces/default/pods/web%3Fx=1/hibernate",
            "pod name",
        ),
        (
            reqwest::Method::DELETE,
            "/api/v1/namespaces/default/persistentvolumeclaims/DATA",
            "volume name",
        ),
        (reqwest::Method::GET, "/api/v1/hosts/h%20ost", "host name"),
    ] {
        let (code, msg) = status_of(send(method, path).await.unwrap()).await;
        assert_eq!(code, 400, "{path}: {msg}");
        assert!(
            msg.starts_with(&format!("the {what} in the URL: ")),
            "{path}: {msg}"
        );
    }

    // A good name still works.
    let resp = send(reqwest::Method::POST, "/api/v1/namespaces/team-a/pods")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(stored_pods(&ts).await, ["team-a/web"]);
}

/// Sends `head` (and `body`, written while the answer is read) on a new
/// connection and returns the answer's status code and text.
async fn raw_request(addr: std::net::SocketAddr, head: String, body: Vec<u8>) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        write.write_all(&body).await?;
        // Keep the socket open until the server has answered.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(write)
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), read.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap_or(0);
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if n == 0 || (text.contains("\r\n\r\n") && text.trim_end().ends_with('}')) {
            break;
        }
    }
    writer.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (code, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_pods_over_the_limits_are_refused_with_the_limit_named() {
    let ts = TestServer::sqlite().await;
    let addr = ts.server.addr();
    let head = |extra: &str| {
        format!(
            "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{extra}\r\n",
            ts.admin_token
        )
    };

    // Declared too large: refused before any of it is read.
    let (code, text) = raw_request(addr, head("Content-Length: 4194304\r\n"), Vec::new()).await;
    assert_eq!(code, 413, "{text}");
    assert!(
        text.contains("the request body is 4194304 bytes: the limit is 3145728 bytes (3 MiB)"),
        "{text}"
    );

    // Without a valid token: refused before the body is read (none is
    // sent here; the answer does not wait for it).
    let (code, text) = raw_request(
        addr,
        "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".into(),
        Vec::new(),
    )
    .await;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("no Authorization header"), "{text}");

    // Chunked, with no length given: refused once it passes the limit.
    let mut chunked = Vec::new();
    for _ in 0..(4 << 20) / 65536 {
        chunked.extend_from_slice(b"10000\r\n");
        chunked.extend_from_slice(&[b' '; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (code, text) = raw_request(addr, head("Transfer-Encoding: chunked\r\n"), chunked).await;
    assert_eq!(code, 413, "{text}");
    assert!(
        text.contains("the limit is 3145728 bytes (3 MiB)"),
        "{text}"
    );

    // A pod of 1.6 MiB (within the body limit) and one with 300 KiB of
    // annotations.
    let http = reqwest::Client::new();
    let create = |p: podvisor_api::Pod| {
        http.post(format!("{}/api/v1/namespaces/default/pods", ts.url()))
            .bearer_auth(&ts.admin_token)
            .json(&p)
            .send()
    };
    let mut big = pod("big", "1", "64Mi");
    big.spec.containers[0].env = (0..100)
        .map(|i| podvisor_api::EnvVar {
            name: format!("V{i}"),
            value: "x".repeat(16 << 10),
        })
        .collect();
    let (code, msg) = status_of(create(big).await.unwrap()).await;
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.contains("the limit is 1572864 bytes (1.5 MiB), as in Kubernetes"),
        "{msg}"
    );
    let mut annotated = pod("annotated", "1", "64Mi");
    annotated
        .metadata
        .annotations
        .insert("example.com/notes".into(), "x".repeat(300 << 10));
    let (code, msg) = status_of(create(annotated).await.unwrap()).await;
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.starts_with("metadata.annotations: ")
            && msg.contains("the limit is 262144 bytes (256 KiB)"),
        "{msg}"
    );
    let mut crowded = pod("crowded", "1", "64Mi");
    crowded.spec.containers = (0..65)
        .map(|i| podvisor_api::Container {
            name: format!("c{i}"),
            ..crowded.spec.containers[0].clone()
        })
        .collect();
    let (code, msg) = status_of(create(crowded).await.unwrap()).await;
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.contains("65 containers: the limit is 64 a pod"),
        "{msg}"
    );
    assert_eq!(stored_pods(&ts).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_yaml_is_refused_in_milliseconds_while_healthz_answers() {
    let ts = TestServer::sqlite().await;
    // 100 KB: a pod whose spec opens 100,000 flow sequences.
    let deep = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: deep}}\nspec: {}\n",
        "[".repeat(100_000)
    );
    let http = reqwest::Client::new();
    let healthz = {
        let (http, url) = (http.clone(), format!("{}/healthz", ts.url()));
        tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                let started = Instant::now();
                let resp = http.get(&url).send().await.unwrap();
                assert_eq!(resp.text().await.unwrap(), "ok");
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            slowest
        })
    };
    // Meanwhile large bodies of ordinary depth keep parsers busy (each is
    // refused only after it is parsed: too many annotations).
    let large = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: large\n  annotations:\n    notes: \"{}\"\nspec:\n  containers:\n  - name: main\n    image: busybox\n",
        "x".repeat(3_000_000)
    );
    let parsers: Vec<_> = (0..4)
        .map(|_| {
            let request = http
                .post(format!("{}/api/v1/namespaces/default/pods", ts.url()))
                .bearer_auth(&ts.admin_token)
                .header("content-type", "application/yaml")
                .body(large.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let (code, msg) = status_of(request.send().await.unwrap()).await;
                assert_eq!(code, 422, "{msg}");
                assert!(msg.contains("the limit is 262144 bytes"), "{msg}");
                started.elapsed()
            })
        })
        .collect();
    let mut slowest_refusal = Duration::ZERO;
    for _ in 0..8 {
        let started = Instant::now();
        let resp = http
            .post(format!("{}/api/v1/namespaces/default/pods", ts.url()))
            .bearer_auth(&ts.admin_token)
            .header("content-type", "application/yaml")
            .body(deep.clone())
            .send()
            .await
            .unwrap();
        let (code, msg) = status_of(resp).await;
        slowest_refusal = slowest_refusal.max(started.elapsed());
        assert_eq!(code, 400);
        assert!(
            msg.starts_with(
                "the document nests deeper than 64 levels: refused before parsing (line 4"
            ),
            "{msg}"
        );
    }
    let slowest_healthz = healthz.await.unwrap();
    for parser in parsers {
        println!(
            "a 3 MB pod parsed and refused in {:?}",
            parser.await.unwrap()
        );
    }
    println!(
        "deep YAML refused in at most {slowest_refusal:?}; /healthz in at most {slowest_healthz:?}"
    );
    // Was ~38 s of CPU each; the bound leaves room for a loaded machine.
    assert!(
        slowest_refusal < Duration::from_millis(500),
        "{slowest_refusal:?}"
    );
    assert!(
        slowest_healthz < Duration::from_millis(500),
        "{slowest_healthz:?}"
    );
    assert_eq!(stored_pods(&ts).await, Vec::<String>::new());
}

/// Whether the server closed `stream` (a read gives end of file or an
/// error) within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_neither_keep_out_clients_nor_stay() {
    let header_timeout = Duration::from_secs(4);
    let idle_timeout = Duration::from_secs(6);
    let ts = TestServer::start(None, |config| {
        config.limits.header_read_timeout = header_timeout;
        config.limits.idle_timeout = idle_timeout;
        config.limits.max_connections = 700;
        config.limits.max_unauthenticated = 500;
    })
    .await;
    let addr = ts.server.addr();
    let pods_url = format!("{}/api/v1/namespaces/default/pods", ts.url());

    // A client that was answered before the crowd came keeps its
    // connection (authenticated ones are never closed to make room).
    let early = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap();
    let get = |client: &reqwest::Client| client.get(&pods_url).bearer_auth(&ts.admin_token).send();
    assert_eq!(get(&early).await.unwrap().status().as_u16(), 200);

    // A keep-alive connection that was answered once and then waits.
    let mut kept_alive = TcpStream::connect(addr).await.unwrap();
    kept_alive
        .write_all(
            format!(
                "GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
                ts.admin_token
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept_alive.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let kept_alive_since = Instant::now();

    // 1,000 connections that send nothing.
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    println!("1,000 idle connections opened in {:?}", opened.elapsed());

    // A slowloris client: header bytes one at a time, 200 ms apart.
    let slowloris_started = Instant::now();
    let slowloris = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        for byte in head {
            if stream.write_all(&[*byte]).await.is_err() {
                return slowloris_started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Sent everything but the final blank line: wait to be closed.
        let mut buf = [0u8; 64];
        let _ = stream.read(&mut buf).await;
        slowloris_started.elapsed()
    });

    // A new client, and the one answered before, each answered in time.
    for client in [reqwest::Client::new(), early.clone()] {
        let started = Instant::now();
        let resp = get(&client).await.unwrap();
        let took = started.elapsed();
        assert_eq!(resp.status().as_u16(), 200);
        let list: serde_json::Value = resp.json().await.unwrap();
        assert!(list["items"].is_array());
        println!("an authenticated get pods among them took {took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    // The server keeps at most 500 unauthenticated connections: the
    // oldest idle ones were closed to make room.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut open = 0;
    for stream in &mut idle {
        if !closed_within(stream, Duration::from_millis(1)).await {
            open += 1;
        }
    }
    assert!(open <= 500, "{open} of the idle connections are still open");

    // After the header-read timeout every idle one is closed, and the
    // slowloris client too; the kept-alive one after the idle timeout.
    let margin = Duration::from_secs(3);
    for stream in &mut idle {
        let left = (opened + header_timeout + margin).saturating_duration_since(Instant::now());
        assert!(
            closed_within(stream, left).await,
            "an idle connection stayed open"
        );
    }
    let slow = slowloris.await.unwrap();
    assert!(
        slow >= header_timeout && slow < header_timeout + margin,
        "the slowloris connection was closed after {slow:?}"
    );
    let left = (kept_alive_since + idle_timeout + margin).saturating_duration_since(Instant::now());
    assert!(closed_within(&mut kept_alive, left).await);
    assert!(kept_alive_since.elapsed() >= idle_timeout - Duration::from_millis(100));
    // (A new client: `early`'s idle connection is being closed about now.)
    let after = get(&reqwest::Client::new()).await.unwrap();
    assert_eq!(after.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_requests_are_timed_but_watches_are_not() {
    let ts = TestServer::start(None, |config| {
        config.limits.request_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = ts.server.addr();

    // A body that stops coming: 504 once the request timeout passes.
    let head = format!(
        "POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        ts.admin_token
    );
    let started = Instant::now();
    let (code, text) = raw_request(addr, head, b"{\"metadata\":".to_vec()).await;
    assert_eq!(code, 504, "{text}");
    assert!(text.contains("did not complete within 1 s"), "{text}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    // A watch outlives it and still gets events.
    let mut watch = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/namespaces/default/pods?watch=true",
            ts.url()
        ))
        .bearer_auth(&ts.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ts.admin
        .create_pod(&pod("late", "1", "64Mi"))
        .await
        .unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(10), watch.chunk())
        .await
        .expect("an event")
        .unwrap()
        .expect("the watch is still open");
    let text = String::from_utf8_lossy(&chunk);
    assert!(
        text.contains("\"ADDED\"") && text.contains("\"late\""),
        "{text}"
    );
}

/// p50 and p99 of `n` sequential authenticated `get pods` on one
/// keep-alive connection.
async fn get_pods_latency(ts: &TestServer, n: usize) -> (Duration, Duration) {
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/namespaces/default/pods", ts.url());
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let resp = client
            .get(&url)
            .bearer_auth(&ts.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        resp.bytes().await.unwrap();
        took.push(started.elapsed());
    }
    took.sort();
    (took[n / 2], took[n * 99 / 100])
}

/// The figure of docs/BENCHMARKS.md: `get pods` latency with 1,000 idle
/// connections open against none, same server, same run.
/// `cargo test --release -p podvisor-server --test limits -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: prints figures"]
async fn get_pods_latency_with_1000_idle_connections() {
    let ts = TestServer::start(None, |config| {
        // Keep the idle connections for the whole measurement.
        config.limits.header_read_timeout = Duration::from_secs(600);
    })
    .await;
    for i in 0..10 {
        ts.admin
            .create_pod(&pod(&format!("p{i}"), "1", "64Mi"))
            .await
            .unwrap();
    }
    let n = 2000;
    get_pods_latency(&ts, 200).await;
    let (p50, p99) = get_pods_latency(&ts, n).await;
    println!("no idle connections:     get pods p50 {p50:?} p99 {p99:?} ({n} requests)");
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(ts.server.addr()).await.unwrap());
    }
    let (p50, p99) = get_pods_latency(&ts, n).await;
    println!("1,000 idle connections:  get pods p50 {p50:?} p99 {p99:?} ({n} requests)");
    let (p50, p99) = {
        drop(idle);
        tokio::time::sleep(Duration::from_millis(500)).await;
        get_pods_latency(&ts, n).await
    };
    println!("none again:              get pods p50 {p50:?} p99 {p99:?} ({n} requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_closes_its_idle_connections_and_its_port() {
    let ts = TestServer::sqlite().await;
    let addr = ts.server.addr();
    let mut kept_alive = TcpStream::connect(addr).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = kept_alive.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let TestServer { server, .. } = ts;
    server.shutdown();
    assert!(closed_within(&mut kept_alive, Duration::from_secs(2)).await);
    let until = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < until, "the port is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
