//! What asks for a pod's hibernation: the `podvisor.io/hibernate-after`
//! annotation (hibernate the pod once it has been idle that long). Its
//! state is reported as the pod's [`crate::HIBERNATED_CONDITION`].

use std::time::Duration;

use crate::duration::{DURATION_SYNTAX, parse_duration, shorten};
use crate::meta::ObjectMeta;

/// The annotation asking for a pod's hibernation after it has been idle
/// for the duration it holds (a Go duration: `30s`, `5m`, `1h30m`).
pub const HIBERNATE_AFTER_ANNOTATION: &str = "podvisor.io/hibernate-after";

/// How long the pod may be idle before it is hibernated: its
/// [`HIBERNATE_AFTER_ANNOTATION`], or `None` without one. A value that is
/// not a Go duration, or is zero, is an error saying what is wrong and
/// what is accepted (validation refuses such pods, so the server stores
/// none).
pub fn hibernate_after(meta: &ObjectMeta) -> Result<Option<Duration>, String> {
    let Some(value) = meta.annotations.get(HIBERNATE_AFTER_ANNOTATION) else {
        return Ok(None);
    };
    match parse_duration(value) {
        Ok(d) if d.is_zero() => Err(format!(
            "{:?} is zero: the pod would never be awake; use {DURATION_SYNTAX}, more than 0 \
             (or leave the annotation out)",
            shorten(value)
        )),
        Ok(d) => Ok(Some(d)),
        Err(problem) => Err(format!(
            "{:?} is not a duration ({problem}): use {DURATION_SYNTAX}, more than 0",
            shorten(value)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(value: Option<&str>) -> ObjectMeta {
        let mut meta = ObjectMeta::default();
        if let Some(v) = value {
            meta.annotations
                .insert(HIBERNATE_AFTER_ANNOTATION.into(), v.into());
        }
        meta.annotations.insert("other".into(), "5x".into());
        meta
    }

    #[test]
    fn the_annotation_is_a_positive_go_duration() {
        assert_eq!(hibernate_after(&meta(None)), Ok(None));
        assert_eq!(
            hibernate_after(&meta(Some("1h30m"))),
            Ok(Some(Duration::from_secs(5400)))
        );
        assert_eq!(
            hibernate_after(&meta(Some("500ms"))),
            Ok(Some(Duration::from_millis(500)))
        );
        for zero in ["0", "0s", "0.0h"] {
            let e = hibernate_after(&meta(Some(zero))).unwrap_err();
            assert!(e.contains("is zero"), "{e}");
        }
        let e = hibernate_after(&meta(Some("5 minutes"))).unwrap_err();
        assert!(
            e.starts_with("\"5 minutes\" is not a duration (unknown unit \" minutes\""),
            "{e}"
        );
        assert!(e.contains("such as 30s, 5m, 1h30m"), "{e}");
        let e = hibernate_after(&meta(Some("-5m"))).unwrap_err();
        assert!(e.contains("a duration has no sign"), "{e}");
        let e = hibernate_after(&meta(Some(""))).unwrap_err();
        assert!(e.contains("the duration is empty"), "{e}");
        // A long value is not repeated whole.
        let long = "9".repeat(10_000);
        let e = hibernate_after(&meta(Some(&long))).unwrap_err();
        assert!(e.len() < 400, "{e}");
    }
}
