//! A Java HTTP server image for JVM tests and benchmarks: busybox, the
//! host's JDK 17 ([`jdk_layer`]) and an application layer with a jar
//! compiled here by the host's `javac` (a `com.sun.net.httpserver` server
//! answering `hello from <greeting>` on its port, after printing
//! `listening on <port>`). Class-data archives need the class path to be
//! jars, not directories.

use std::io;
use std::path::Path;
use std::process::Command;

use crate::host_layer::jdk_layer;
use crate::oci::{Entry, ImageBuilder};

/// The server's jar in the image.
pub const JAR: &str = "/app/hello.jar";

/// The source of the server; `greeting` is compiled in, so two greetings
/// make two different application layers.
fn source(greeting: &str) -> String {
    format!(
        r#"import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
public class Hello {{
    public static void main(String[] a) throws Exception {{
        int port = Integer.parseInt(a.length > 0 ? a[0] : "8080");
        HttpServer s = HttpServer.create(new InetSocketAddress(port), 0);
        s.createContext("/", ex -> {{
            byte[] b = "hello from {greeting}\n".getBytes();
            ex.sendResponseHeaders(200, b.length);
            ex.getResponseBody().write(b);
            ex.close();
        }});
        s.start();
        System.out.println("listening on " + port);
    }}
}}
"#
    )
}

/// The jar of the server with `greeting`, built in `work` (a scratch
/// directory).
pub fn hello_jar(work: &Path, greeting: &str) -> io::Result<Vec<u8>> {
    let name: String = greeting
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let dir = work.join(format!("hello-{name}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("Hello.java"), source(greeting))?;
    std::fs::write(dir.join("manifest.txt"), "Main-Class: Hello\n")?;
    let run = |cmd: &mut Command| -> io::Result<()> {
        let out = cmd.current_dir(&dir).output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    };
    run(Command::new("javac").args(["-d", ".", "Hello.java"]))?;
    run(Command::new("jar").args(["cfm", "hello.jar", "manifest.txt", "Hello.class"]))?;
    std::fs::read(dir.join("hello.jar"))
}

/// The image: busybox, the JDK, the jar; its entrypoint runs the server
/// on `port` with `java_args` before `-jar`.
pub fn java_image(
    work: &Path,
    greeting: &str,
    port: u16,
    java_args: &[&str],
) -> io::Result<ImageBuilder> {
    let jar = hello_jar(work, greeting)?;
    let mut entrypoint = vec!["/usr/bin/java"];
    entrypoint.extend_from_slice(java_args);
    let port = port.to_string();
    entrypoint.extend_from_slice(&["-jar", JAR, &port]);
    Ok(ImageBuilder::new()
        .busybox_layer()
        .layer(jdk_layer().entries())
        .layer(vec![
            Entry::dir("app"),
            Entry::file("app/hello.jar", jar, 0o644),
        ])
        .entrypoint(&entrypoint))
}
