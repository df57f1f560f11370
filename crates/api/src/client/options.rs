//! Options and results of client calls: which pods, which logs, what an
//! apply did.

use bytes::Bytes;
use futures_util::Stream;

use super::ClientError;
use crate::pod::Pod;

/// Which pods a list or watch covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFilter {
    /// One namespace, or all of them (`None`).
    pub namespace: Option<String>,
    /// Only pods assigned to this host (`fieldSelector=spec.nodeName=H`).
    pub node_name: Option<String>,
}

impl PodFilter {
    /// Pods of every namespace assigned to `host`.
    pub fn on_host(host: &str) -> PodFilter {
        PodFilter {
            namespace: None,
            node_name: Some(host.to_string()),
        }
    }

    /// Every pod.
    pub fn all() -> PodFilter {
        PodFilter::default()
    }

    /// Pods of one namespace.
    pub fn in_namespace(namespace: &str) -> PodFilter {
        PodFilter {
            namespace: Some(namespace.to_string()),
            node_name: None,
        }
    }

    pub(super) fn path(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("api/v1/namespaces/{ns}/pods"),
            None => "api/v1/pods".into(),
        }
    }

    pub(super) fn query(&self) -> Vec<(&'static str, String)> {
        match &self.node_name {
            Some(node) => vec![("fieldSelector", format!("spec.nodeName={node}"))],
            None => vec![],
        }
    }
}

/// Options of a log request.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// The container (needed when the pod has several).
    pub container: Option<String>,
    /// Keep streaming new output until the container ends.
    pub follow: bool,
    /// Only the last N lines.
    pub tail_lines: Option<u64>,
}

/// What an apply did.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The pod as stored.
    pub pod: Pod,
    /// `created`, `configured` or `unchanged`.
    pub outcome: String,
}

/// A stream of log bytes.
pub type LogStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, ClientError>> + Send>>;
