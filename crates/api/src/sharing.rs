//! What a pod says about sharing and sizing, through annotations:
//! `podvisor.io/isolated: "true"` (share no memory with other pods: no
//! layer pages through DAX, no KSM merging, no VM template) and
//! `podvisor.io/runtime-profile: none` (leave the containers' language
//! runtimes to their own defaults instead of sizing them to the pod VM).

use crate::meta::ObjectMeta;

/// `"true"`: the pod shares no memory with other pods. Shared pages are a
/// cross-VM side channel (a pod can time accesses to pages another pod
/// also maps), so a pod that asks for isolation gets private copies.
pub const ISOLATED_ANNOTATION: &str = "podvisor.io/isolated";

/// `none`: podvisor leaves the containers' runtimes alone; `auto` (the
/// default): it sizes each JVM, Go, Node.js and CPython container to its
/// share of the pod VM.
pub const RUNTIME_PROFILE_ANNOTATION: &str = "podvisor.io/runtime-profile";

/// Whether the pod asked for isolation; a value other than `"true"` or
/// `"false"` is an error (validation refuses such pods).
pub fn isolated(meta: &ObjectMeta) -> Result<bool, String> {
    match meta
        .annotations
        .get(ISOLATED_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(format!(
            "{:?} is neither \"true\" nor \"false\"",
            crate::duration::shorten(other)
        )),
    }
}

/// Whether podvisor sizes the pod's runtimes; a value other than `auto` or
/// `none` is an error (validation refuses such pods).
pub fn runtime_profile(meta: &ObjectMeta) -> Result<bool, String> {
    match meta
        .annotations
        .get(RUNTIME_PROFILE_ANNOTATION)
        .map(String::as_str)
    {
        None | Some("auto") => Ok(true),
        Some("none") => Ok(false),
        Some(other) => Err(format!(
            "{:?} is neither \"auto\" nor \"none\"",
            crate::duration::shorten(other)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, value: &str) -> ObjectMeta {
        let mut m = ObjectMeta::default();
        m.annotations.insert(key.into(), value.into());
        m
    }

    #[test]
    fn annotations_read_and_refuse_unknown_values() {
        assert_eq!(isolated(&ObjectMeta::default()), Ok(false));
        assert_eq!(isolated(&meta(ISOLATED_ANNOTATION, "true")), Ok(true));
        assert!(
            isolated(&meta(ISOLATED_ANNOTATION, "yes"))
                .unwrap_err()
                .contains("\"yes\"")
        );
        assert_eq!(runtime_profile(&ObjectMeta::default()), Ok(true));
        assert_eq!(
            runtime_profile(&meta(RUNTIME_PROFILE_ANNOTATION, "none")),
            Ok(false)
        );
        assert!(runtime_profile(&meta(RUNTIME_PROFILE_ANNOTATION, "off")).is_err());
    }
}
