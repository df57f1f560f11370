//! A CNI runtime per spec 1.0 (the parts libcni's `AddNetworkList`,
//! `DelNetworkList` and `CheckNetworkList` do): runs each plugin of a list
//! with a cleared environment plus the `CNI_*` variables, the plugin's
//! configuration on stdin (with `name`, `cniVersion`, `prevResult` and the
//! `runtimeConfig` of the capabilities it declares), within a time limit.
//! Nothing here touches the process environment.

pub mod conf;
pub mod result;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

pub use conf::{DefaultNetwork, NetworkConfList};
pub use result::{CniDns, CniInterface, CniIp, CniResult, CniRoute, IpPrefix};

/// Where plugins are looked for when nothing else is configured: Debian's
/// package, then the upstream default.
pub const DEFAULT_CNI_PATH: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// `PATH` given to plugins: they run `iptables` and friends. libcni hands
/// plugins the runtime's whole environment; podvisor hands them this only.
const PLUGIN_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// At most this much of a plugin's stdout / stderr is read.
const MAX_PLUGIN_OUTPUT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI configuration directory {dir}")]
    ConfDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading CNI configuration {path}")]
    ConfFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI configuration {path} is invalid: {reason}")]
    BadConfList { path: PathBuf, reason: String },
    #[error("CNI plugin {plugin:?} not found in {}", search_path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":"))]
    PluginNotFound {
        plugin: String,
        search_path: Vec<PathBuf>,
    },
    #[error("starting CNI plugin {plugin:?} ({path})")]
    PluginStart {
        plugin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin:?} {command} did not finish within {timeout:?}")]
    PluginTimeout {
        plugin: String,
        command: CniCommand,
        timeout: Duration,
    },
    #[error("CNI plugin {plugin:?} {command} failed: {msg}{}{} (CNI error code {code})",
        if details.is_empty() { "" } else { ": " }, details)]
    PluginFailed {
        plugin: String,
        command: CniCommand,
        code: u64,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin:?} {command} exited with {status} without a CNI error: {stderr}")]
    PluginCrashed {
        plugin: String,
        command: CniCommand,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("CNI plugin {plugin:?} {command} printed an unreadable result: {reason}")]
    BadPluginOutput {
        plugin: String,
        command: CniCommand,
        reason: String,
    },
    #[error("CNI_ARGS value {0:?} contains ';' or '='")]
    BadCniArg(String),
}

/// The CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

impl CniCommand {
    fn as_env(self) -> &'static str {
        match self {
            CniCommand::Add => "ADD",
            CniCommand::Del => "DEL",
            CniCommand::Check => "CHECK",
        }
    }
}

impl std::fmt::Display for CniCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_env())
    }
}

/// The Kubernetes identity of a pod, passed as `K8S_POD_*` CNI_ARGS (what
/// Calico and Cilium read).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What one attachment of a pod to a network is, for every plugin call.
#[derive(Debug, Clone)]
pub struct CniAttachment<'a> {
    /// `CNI_CONTAINERID`: the pod sandbox's id.
    pub container_id: &'a str,
    /// `CNI_NETNS`; `None` when the namespace is gone (DEL only).
    pub netns: Option<&'a Path>,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    pub pod: &'a PodIdentity,
    /// Capability arguments by capability name (`portMappings`, ...), given
    /// as `runtimeConfig` to the plugins that declare the capability.
    pub capability_args: &'a BTreeMap<String, Value>,
}

impl CniAttachment<'_> {
    /// `IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..`
    pub fn cni_args(&self) -> Result<String, CniError> {
        let pairs = [
            ("K8S_POD_NAMESPACE", self.pod.namespace.as_str()),
            ("K8S_POD_NAME", self.pod.name.as_str()),
            ("K8S_POD_INFRA_CONTAINER_ID", self.container_id),
            ("K8S_POD_UID", self.pod.uid.as_str()),
        ];
        let mut args = String::from("IgnoreUnknown=1");
        for (k, v) in pairs {
            if v.contains([';', '=']) {
                return Err(CniError::BadCniArg(v.to_string()));
            }
            args.push_str(&format!(";{k}={v}"));
        }
        Ok(args)
    }
}

/// An ADD that failed at some plugin: the error, and the result of the
/// plugins before it (what DEL gets as `prevResult`).
#[derive(Debug)]
pub struct AddFailure {
    pub error: CniError,
    pub partial_result: Option<Value>,
}

/// Runs plugins found in a search path, with a time limit per call.
#[derive(Debug, Clone)]
pub struct CniRuntime {
    pub search_path: Vec<PathBuf>,
    pub timeout: Duration,
}

impl Default for CniRuntime {
    fn default() -> Self {
        Self {
            search_path: DEFAULT_CNI_PATH.iter().map(PathBuf::from).collect(),
            timeout: Duration::from_secs(30),
        }
    }
}

impl CniRuntime {
    /// The plugin's executable: the first `dir/type` in the search path.
    pub fn find_plugin(&self, plugin: &str) -> Result<PathBuf, CniError> {
        if conf::is_plain_file_name(plugin) {
            for dir in &self.search_path {
                let candidate = dir.join(plugin);
                if candidate.is_file() {
                    return Ok(candidate);
                }
            }
        }
        Err(CniError::PluginNotFound {
            plugin: plugin.to_string(),
            search_path: self.search_path.clone(),
        })
    }

    /// Fails with the first plugin of `list` that is not installed (checked
    /// before ADD so that a missing plugin sets nothing up).
    pub fn check_plugins_installed(&self, list: &NetworkConfList) -> Result<(), CniError> {
        for i in 0..list.plugins.len() {
            self.find_plugin(list.plugin_type(i))?;
        }
        Ok(())
    }

    /// ADD through the chain in order, each plugin getting the previous one's
    /// result; returns the last result (raw, for DEL and CHECK) on success.
    pub async fn add(
        &self,
        list: &NetworkConfList,
        att: &CniAttachment<'_>,
    ) -> Result<Value, AddFailure> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            match self.add_plugin(list, i, prev.as_ref(), att).await {
                Ok(result) => prev = Some(result),
                Err(error) => {
                    return Err(AddFailure {
                        error,
                        partial_result: prev,
                    });
                }
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// ADD of plugin `i` alone, given the result of the plugins before it
    /// (for a caller that records progress between plugins).
    pub async fn add_plugin(
        &self,
        list: &NetworkConfList,
        i: usize,
        prev_result: Option<&Value>,
        att: &CniAttachment<'_>,
    ) -> Result<Value, CniError> {
        let conf = plugin_conf(list, i, prev_result, att.capability_args);
        self.invoke(list.plugin_type(i), CniCommand::Add, &conf, att)
            .await?
            .ok_or_else(|| CniError::BadPluginOutput {
                plugin: list.plugin_type(i).to_string(),
                command: CniCommand::Add,
                reason: "no result on stdout".into(),
            })
    }

    /// DEL through the chain in reverse. Every plugin is asked even when one
    /// fails (DEL is idempotent per the spec); the first error is returned.
    /// `prev_result` (the stored ADD result) is passed from CNI 0.4.0 on, as
    /// libcni does.
    pub async fn del(
        &self,
        list: &NetworkConfList,
        att: &CniAttachment<'_>,
        prev_result: Option<&Value>,
    ) -> Result<(), CniError> {
        let prev =
            prev_result.filter(|_| list.cni_version != "0.3.0" && list.cni_version != "0.3.1");
        let mut first_error = None;
        for i in (0..list.plugins.len()).rev() {
            let conf = plugin_conf(list, i, prev, att.capability_args);
            if let Err(e) = self
                .invoke(list.plugin_type(i), CniCommand::Del, &conf, att)
                .await
            {
                tracing::warn!(plugin = list.plugin_type(i), error = %e, "CNI DEL failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// CHECK through the chain in order with the stored result (a no-op for
    /// lists before CNI 0.4.0 or with `disableCheck`).
    pub async fn check(
        &self,
        list: &NetworkConfList,
        att: &CniAttachment<'_>,
        prev_result: &Value,
    ) -> Result<(), CniError> {
        if list.disable_check || matches!(list.cni_version.as_str(), "0.3.0" | "0.3.1") {
            return Ok(());
        }
        for i in 0..list.plugins.len() {
            let conf = plugin_conf(list, i, Some(prev_result), att.capability_args);
            self.invoke(list.plugin_type(i), CniCommand::Check, &conf, att)
                .await?;
        }
        Ok(())
    }

    /// Runs one plugin; `Ok(Some(result))` when it printed one.
    async fn invoke(
        &self,
        plugin: &str,
        command: CniCommand,
        conf: &Value,
        att: &CniAttachment<'_>,
    ) -> Result<Option<Value>, CniError> {
        let path = self.find_plugin(plugin)?;
        let search_path = std::env::join_paths(&self.search_path).unwrap_or_default();
        let mut cmd = Command::new(&path);
        cmd.env_clear()
            .env("PATH", PLUGIN_PATH_ENV)
            .env("CNI_COMMAND", command.as_env())
            .env("CNI_CONTAINERID", att.container_id)
            .env(
                "CNI_NETNS",
                att.netns.map(Path::as_os_str).unwrap_or_default(),
            )
            .env("CNI_IFNAME", att.ifname)
            .env("CNI_ARGS", att.cni_args()?)
            .env("CNI_PATH", search_path)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A plugin dies with podvisor (kill -9 included): one left running
        // could finish its ADD after reconcile has DELeted the attachment.
        // (The signal follows the thread that forked, which lives at least
        // as long as this call: a tokio worker, or a thread blocked on it.)
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other(
                        "podvisor exited while starting the plugin",
                    ));
                }
                Ok(())
            });
        }
        let start = |source| CniError::PluginStart {
            plugin: plugin.to_string(),
            path: path.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(start)?;
        let stdin_bytes = serde_json::to_vec(conf).expect("a JSON value serializes");
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let run = async {
            use tokio::io::AsyncWriteExt;
            let write = async {
                // A plugin may exit without reading its input: a broken pipe
                // then is not the error to report.
                let _ = stdin.write_all(&stdin_bytes).await;
                drop(stdin);
            };
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut limited_out = (&mut stdout).take(MAX_PLUGIN_OUTPUT);
            let mut limited_err = (&mut stderr).take(MAX_PLUGIN_OUTPUT);
            let (_, r1, r2) = tokio::join!(
                write,
                limited_out.read_to_end(&mut out),
                limited_err.read_to_end(&mut err)
            );
            r1.and(r2)?;
            let status = child.wait().await?;
            Ok::<_, std::io::Error>((status, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(self.timeout, run).await {
            Ok(r) => r.map_err(start)?,
            Err(_) => {
                return Err(CniError::PluginTimeout {
                    plugin: plugin.to_string(),
                    command,
                    timeout: self.timeout,
                });
            }
        };
        if !err.is_empty() {
            tracing::debug!(plugin, %command, stderr = %String::from_utf8_lossy(&err), "CNI plugin stderr");
        }
        let parsed: Option<Value> = if out.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice(&out).ok()
        };
        if !status.success() {
            if let Some(Value::Object(e)) = &parsed
                && let Some(code) = e.get("code").and_then(Value::as_u64)
            {
                return Err(CniError::PluginFailed {
                    plugin: plugin.to_string(),
                    command,
                    code,
                    msg: e
                        .get("msg")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    details: e
                        .get("details")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                });
            }
            return Err(CniError::PluginCrashed {
                plugin: plugin.to_string(),
                command,
                status,
                stderr: String::from_utf8_lossy(&err)
                    .trim()
                    .chars()
                    .take(2000)
                    .collect(),
            });
        }
        match parsed {
            None if out.iter().all(u8::is_ascii_whitespace) => Ok(None),
            None => Err(CniError::BadPluginOutput {
                plugin: plugin.to_string(),
                command,
                reason: "stdout is not JSON".into(),
            }),
            Some(v @ Value::Object(_)) => Ok(Some(v)),
            Some(_) => Err(CniError::BadPluginOutput {
                plugin: plugin.to_string(),
                command,
                reason: "stdout is not a JSON object".into(),
            }),
        }
    }
}

/// The configuration plugin `i` reads on stdin (libcni's `buildOneConfig`
/// plus `injectRuntimeConfig`).
pub fn plugin_conf(
    list: &NetworkConfList,
    i: usize,
    prev_result: Option<&Value>,
    capability_args: &BTreeMap<String, Value>,
) -> Value {
    let mut conf: Map<String, Value> = list.plugins[i].clone();
    conf.insert("name".into(), Value::String(list.name.clone()));
    conf.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    let mut runtime_config = Map::new();
    if let Some(Value::Object(caps)) = list.plugins[i].get("capabilities") {
        for (cap, enabled) in caps {
            if enabled == &Value::Bool(true)
                && let Some(arg) = capability_args.get(cap)
            {
                runtime_config.insert(cap.clone(), arg.clone());
            }
        }
    }
    if !runtime_config.is_empty() {
        conf.insert("runtimeConfig".into(), Value::Object(runtime_config));
    }
    Value::Object(conf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn list() -> NetworkConfList {
        NetworkConfList::parse(
            DefaultNetwork::default()
                .conflist_json()
                .to_string()
                .as_bytes(),
            Path::new("default"),
        )
        .unwrap()
    }

    #[test]
    fn runtime_config_goes_only_to_plugins_declaring_the_capability() {
        let mut caps = BTreeMap::new();
        caps.insert(
            "portMappings".to_string(),
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]),
        );
        caps.insert("bandwidth".to_string(), json!({"ingressRate": 1}));
        let prev = json!({"cniVersion": "1.0.0", "ips": []});
        let bridge = plugin_conf(&list(), 0, None, &caps);
        assert_eq!(bridge["name"], "podvisor");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());
        let portmap = plugin_conf(&list(), 2, Some(&prev), &caps);
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": caps["portMappings"]})
        );
        assert_eq!(portmap["prevResult"], prev);
    }

    #[test]
    fn cni_args_carry_the_kubernetes_identity() {
        let pod = PodIdentity {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u-1".into(),
        };
        let caps = BTreeMap::new();
        let att = CniAttachment {
            container_id: "p1",
            netns: None,
            ifname: "eth0",
            pod: &pod,
            capability_args: &caps,
        };
        assert_eq!(
            att.cni_args().unwrap(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=p1;K8S_POD_UID=u-1"
        );
        let bad = PodIdentity {
            name: "a;b=c".into(),
            ..pod.clone()
        };
        let att = CniAttachment { pod: &bad, ..att };
        assert!(matches!(att.cni_args(), Err(CniError::BadCniArg(_))));
    }

    /// A fake plugin: a shell script named `name` in `dir`.
    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn fake_list(types: &[&str]) -> NetworkConfList {
        let plugins: Vec<Value> = types.iter().map(|t| json!({"type": t})).collect();
        let text = json!({"cniVersion": "1.0.0", "name": "fake", "plugins": plugins}).to_string();
        NetworkConfList::parse(text.as_bytes(), Path::new("fake")).unwrap()
    }

    fn fake_attachment<'a>(
        pod: &'a PodIdentity,
        caps: &'a BTreeMap<String, Value>,
    ) -> CniAttachment<'a> {
        CniAttachment {
            container_id: "c1",
            netns: Some(Path::new("/run/x/netns/c1")),
            ifname: "eth0",
            pod,
            capability_args: caps,
        }
    }

    #[tokio::test]
    async fn plugins_get_a_cleared_environment_and_the_previous_result() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        script(
            dir.path(),
            "first",
            &format!(
                "env > {d}/env; cat > {d}/stdin1; echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.0.0.2/24\"}}]}}'"
            ),
        );
        script(
            dir.path(),
            "second",
            &format!(
                "cat > {d}/stdin2; echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.0.0.2/24\"}}],\"dns\":{{\"nameservers\":[\"10.0.0.53\"]}}}}'"
            ),
        );
        let rt = CniRuntime {
            search_path: vec![dir.path().to_path_buf()],
            timeout: Duration::from_secs(10),
        };
        let pod = PodIdentity {
            namespace: "ns".into(),
            name: "web".into(),
            uid: "u1".into(),
        };
        let caps = BTreeMap::new();
        let result = rt
            .add(
                &fake_list(&["first", "second"]),
                &fake_attachment(&pod, &caps),
            )
            .await
            .unwrap();
        assert_eq!(
            CniResult::from_json(&result).unwrap().dns.nameservers,
            ["10.0.0.53"]
        );

        let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let mut vars: Vec<&str> = env
            .lines()
            .filter(|l| {
                !["PWD=", "OLDPWD=", "SHLVL=", "_="]
                    .iter()
                    .any(|shell| l.starts_with(shell))
            })
            .collect();
        vars.sort();
        assert_eq!(
            vars,
            [
                "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u1",
                "CNI_COMMAND=ADD",
                "CNI_CONTAINERID=c1",
                "CNI_IFNAME=eth0",
                "CNI_NETNS=/run/x/netns/c1",
                &format!("CNI_PATH={d}"),
                &format!("PATH={PLUGIN_PATH_ENV}"),
            ]
        );
        let stdin1: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("stdin1")).unwrap()).unwrap();
        assert_eq!(
            stdin1,
            json!({"type": "first", "name": "fake", "cniVersion": "1.0.0"})
        );
        let stdin2: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("stdin2")).unwrap()).unwrap();
        assert_eq!(stdin2["prevResult"]["ips"][0]["address"], "10.0.0.2/24");
    }

    #[tokio::test]
    async fn plugin_failures_name_the_plugin_and_keep_the_partial_result() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "ok",
            "cat >/dev/null; echo '{\"cniVersion\":\"1.0.0\"}'",
        );
        script(
            dir.path(),
            "failing",
            "echo '{\"cniVersion\":\"1.0.0\",\"code\":7,\"msg\":\"bad thing\",\"details\":\"more\"}'; exit 1",
        );
        script(dir.path(), "crashing", "echo boom >&2; exit 3");
        script(dir.path(), "hanging", "exec sleep 30");
        let rt = CniRuntime {
            search_path: vec![dir.path().to_path_buf()],
            timeout: Duration::from_millis(300),
        };
        let pod = PodIdentity::default();
        let caps = BTreeMap::new();
        let att = fake_attachment(&pod, &caps);

        let failure = rt
            .add(&fake_list(&["ok", "failing", "ok"]), &att)
            .await
            .unwrap_err();
        assert_eq!(
            failure.error.to_string(),
            "CNI plugin \"failing\" ADD failed: bad thing: more (CNI error code 7)"
        );
        assert_eq!(failure.partial_result, Some(json!({"cniVersion": "1.0.0"})));

        let failure = rt.add(&fake_list(&["crashing"]), &att).await.unwrap_err();
        let msg = failure.error.to_string();
        assert!(
            msg.starts_with("CNI plugin \"crashing\" ADD exited with exit status: 3")
                && msg.ends_with("boom"),
            "{msg}"
        );
        assert_eq!(failure.partial_result, None);

        let started = std::time::Instant::now();
        let failure = rt.add(&fake_list(&["hanging"]), &att).await.unwrap_err();
        assert_eq!(
            failure.error.to_string(),
            "CNI plugin \"hanging\" ADD did not finish within 300ms"
        );
        assert!(started.elapsed() < Duration::from_secs(5));

        // DEL asks every plugin, in reverse, and reports the first failure.
        let err = rt
            .del(&fake_list(&["failing", "ok", "crashing"]), &att, None)
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with("CNI plugin \"crashing\" DEL"),
            "{err}"
        );
    }

    #[test]
    fn a_plugin_dies_with_the_thread_that_started_it() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        script(
            dir.path(),
            "sleeper",
            &format!("echo $$ > {}; exec sleep 30", pid_file.display()),
        );
        let search_path = vec![dir.path().to_path_buf()];
        let pid_file2 = pid_file.clone();
        // The thread starts the plugin and exits without awaiting or
        // dropping the call, as if podvisor had been killed meanwhile.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let runtime = CniRuntime {
                search_path,
                timeout: Duration::from_secs(60),
            };
            let pod = PodIdentity::default();
            let caps = BTreeMap::new();
            let list = fake_list(&["sleeper"]);
            let att = fake_attachment(&pod, &caps);
            let mut call = Box::pin(runtime.add(&list, &att));
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    loop {
                        tokio::select! {
                            _ = &mut call => break,
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                                if pid_file2.exists() { break; }
                            }
                        }
                    }
                })
                .await;
            });
            std::mem::forget(call);
            std::mem::forget(rt);
        })
        .join()
        .unwrap();
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "plugin {pid} outlived the thread that started it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_zombie(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    }

    #[test]
    fn a_missing_plugin_is_named_with_the_search_path() {
        let rt = CniRuntime {
            search_path: vec!["/nonexistent/cni".into()],
            timeout: Duration::from_secs(1),
        };
        let err = rt.check_plugins_installed(&list()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "CNI plugin \"bridge\" not found in /nonexistent/cni"
        );
    }
}
