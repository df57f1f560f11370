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
    run_in(&dir, Command::new("javac").args(["-d", ".", "Hello.java"]))?;
    run_in(
        &dir,
        Command::new("jar").args(["cfm", "hello.jar", "manifest.txt", "Hello.class"]),
    )?;
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

/// The jars of Debian's Jetty 9 (`libjetty9-java`) a plain HTTP server
/// needs, as `/usr/share/java` names them.
pub const JETTY_JARS: &[&str] = &[
    "jetty9-server.jar",
    "jetty9-http.jar",
    "jetty9-io.jar",
    "jetty9-util.jar",
    "servlet-api.jar",
];

/// Where the Jetty server's jars are in its image.
const JETTY_LIB: &str = "app/lib";

/// A Jetty handler answering `hello from <greeting>`.
fn jetty_source(greeting: &str) -> String {
    format!(
        r#"import org.eclipse.jetty.server.Request;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.handler.AbstractHandler;
import javax.servlet.http.HttpServletRequest;
import javax.servlet.http.HttpServletResponse;
public class JettyHello {{
    public static void main(String[] a) throws Exception {{
        int port = Integer.parseInt(a.length > 0 ? a[0] : "8080");
        Server s = new Server(port);
        s.setHandler(new AbstractHandler() {{
            public void handle(String target, Request base, HttpServletRequest req,
                               HttpServletResponse resp) throws java.io.IOException {{
                resp.setContentType("text/plain");
                resp.setStatus(200);
                resp.getWriter().println("hello from {greeting}");
                base.setHandled(true);
            }}
        }});
        s.start();
        System.out.println("listening on " + port);
        s.join();
    }}
}}
"#
    )
}

/// A Java HTTP server as people deploy one: busybox, the JDK, Debian's
/// Jetty 9 jars and an application jar, started with a class path of
/// jars. It loads about 1,700 classes (the [`java_image`] server about
/// 1,100, most of them in the JDK's own archive), which is what a
/// class-data archive is for. Needs `libjetty9-java` on the host.
pub fn jetty_image(work: &Path, greeting: &str, port: u16) -> io::Result<ImageBuilder> {
    let share = Path::new("/usr/share/java");
    let dir = work.join("jetty-hello");
    std::fs::create_dir_all(dir.join("classes"))?;
    std::fs::write(dir.join("JettyHello.java"), jetty_source(greeting))?;
    let host_cp: Vec<String> = JETTY_JARS
        .iter()
        .map(|j| share.join(j).display().to_string())
        .collect();
    run_in(
        &dir,
        Command::new("javac").args([
            "-cp",
            &host_cp.join(":"),
            "-d",
            "classes",
            "JettyHello.java",
        ]),
    )?;
    run_in(
        &dir,
        Command::new("jar").args(["cf", "app.jar", "-C", "classes", "."]),
    )?;
    let mut app = vec![
        Entry::dir("app"),
        Entry::dir(JETTY_LIB),
        Entry::file("app/app.jar", std::fs::read(dir.join("app.jar"))?, 0o644),
    ];
    let mut class_path = vec!["/app/app.jar".to_string()];
    for jar in JETTY_JARS {
        let bytes = std::fs::read(share.join(jar)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (install libjetty9-java)",
                    share.join(jar).display()
                ),
            )
        })?;
        app.push(Entry::file(&format!("{JETTY_LIB}/{jar}"), bytes, 0o644));
        class_path.push(format!("/{JETTY_LIB}/{jar}"));
    }
    let class_path = class_path.join(":");
    let port = port.to_string();
    Ok(ImageBuilder::new()
        .busybox_layer()
        .layer(jdk_layer().entries())
        .layer(app)
        .entrypoint(&["/usr/bin/java", "-cp", &class_path, "JettyHello", &port]))
}

/// Runs `cmd` in `dir`; its stderr is the error if it fails.
fn run_in(dir: &Path, cmd: &mut Command) -> io::Result<()> {
    let out = cmd.current_dir(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
