//! Durations written as Go's `time.ParseDuration` (and so Kubernetes)
//! writes them: `30s`, `5m`, `1h30m`, `1.5h`, `500ms`.

use std::time::Duration;

/// The units a duration may use, and what one of each is in nanoseconds.
/// `µs` is accepted with the micro sign (U+00B5) and the Greek mu
/// (U+03BC), as Go does.
const UNITS: [(&str, u64); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("\u{b5}s", 1_000),
    ("\u{3bc}s", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// The longest duration Go can hold (`time.Duration` is an `int64` of
/// nanoseconds, about 292 years): a longer one is refused, as Go refuses
/// it, rather than read as something else.
const MAX_NANOS: u128 = i64::MAX as u128;

/// The units, for error messages.
const UNIT_LIST: &str = "ns, us (or \u{b5}s), ms, s, m or h";

/// What a duration looks like, for error messages.
pub(crate) const DURATION_SYNTAX: &str = "a Go duration: decimal numbers, each with an optional fraction \
     and a unit (ns, us or \u{b5}s, ms, s, m, h), such as 30s, 5m, 1h30m, 1.5h or 500ms";

/// Reads a duration as Go's `time.ParseDuration` does: a sequence of
/// decimal numbers, each with an optional fraction and a unit (`ns`, `us`
/// or `µs`, `ms`, `s`, `m`, `h`), such as `300ms`, `1.5h` or `2h45m`; `0`
/// alone needs no unit. Unlike Go, a sign (`-5s`, `+5s`) is refused: a
/// `Duration` is never negative. At most `i64::MAX` nanoseconds (about 292
/// years), as in Go; digits of a fraction beyond the nanosecond are
/// dropped.
///
/// The error says what is wrong (without repeating the input, which may
/// be long: the caller names it).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err("the duration is empty".into());
    }
    if s.starts_with(['-', '+']) {
        return Err("a duration has no sign".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s.as_bytes();
    let mut total: u128 = 0;
    while !rest.is_empty() {
        // The number: digits, then an optional '.' and more digits, at
        // least one digit in all.
        let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (int_digits, after) = rest.split_at(int_len);
        let mut whole: u128 = 0;
        for &d in int_digits {
            whole = whole * 10 + u128::from(d - b'0');
            if whole > MAX_NANOS {
                return Err(too_long());
            }
        }
        rest = after;
        // The fraction as `frac / scale`, kept to 19 digits (a nanosecond
        // of an hour needs 13); the rest cannot change the result.
        let (mut frac, mut scale): (u128, u128) = (0, 1);
        let mut frac_len = 0;
        let dot = rest.first() == Some(&b'.');
        if let Some((b'.', after)) = rest.split_first() {
            frac_len = after.iter().take_while(|b| b.is_ascii_digit()).count();
            let (frac_digits, after) = after.split_at(frac_len);
            for &d in frac_digits.iter().take(19) {
                frac = frac * 10 + u128::from(d - b'0');
                scale *= 10;
            }
            rest = after;
        }
        if int_len == 0 && frac_len == 0 {
            return Err(if dot {
                "a '.' must have a digit before or after it".into()
            } else {
                "a unit must follow a number".into()
            });
        }
        // The unit: everything up to the next number.
        let unit_len = rest
            .iter()
            .take_while(|b| !b.is_ascii_digit() && **b != b'.')
            .count();
        let (unit, after) = rest.split_at(unit_len);
        rest = after;
        if unit.is_empty() {
            return Err(format!("a number needs a unit ({UNIT_LIST})"));
        }
        let Some(&(_, nanos)) = UNITS.iter().find(|(u, _)| u.as_bytes() == unit) else {
            let unit = String::from_utf8_lossy(unit);
            return Err(format!(
                "unknown unit {:?}: use {UNIT_LIST}",
                shorten(&unit)
            ));
        };
        let nanos = u128::from(nanos);
        total += whole * nanos + frac * nanos / scale;
        if total > MAX_NANOS {
            return Err(too_long());
        }
    }
    let secs = (total / 1_000_000_000) as u64;
    let sub = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

fn too_long() -> String {
    "the duration is longer than Go can hold (about 292 years)".into()
}

/// At most 32 characters of `s`, for an error message.
pub(crate) fn shorten(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(32).collect();
    if chars.next().is_some() {
        format!("{head}...")
    } else {
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match parse_duration(s) {
            Ok(d) => panic!("{s:?} was read as {d:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        let secs = Duration::from_secs;
        for (text, want) in [
            ("30s", secs(30)),
            ("5m", secs(300)),
            ("1h30m", secs(5400)),
            ("1.5h", secs(5400)),
            ("500ms", ms(500)),
            ("90s", secs(90)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1ns", Duration::from_nanos(1)),
            ("1us", Duration::from_micros(1)),
            ("1\u{b5}s", Duration::from_micros(1)),
            ("1\u{3bc}s", Duration::from_micros(1)),
            ("2h45m", secs(2 * 3600 + 45 * 60)),
            (".5s", ms(500)),
            ("5.s", secs(5)),
            ("1.000000001s", Duration::new(1, 1)),
            // Digits past the nanosecond are dropped, as Go drops them.
            ("1.00000000099999999999999999s", Duration::new(1, 0)),
            ("0.000000001h", Duration::from_nanos(3600)),
            ("1h1h", secs(7200)),
            ("3m0.5s", ms(180_500)),
            ("007s", secs(7)),
            (
                "9223372036854775807ns",
                Duration::from_nanos(i64::MAX as u64),
            ),
            (
                "2562047h47m16.854775807s",
                Duration::from_nanos(i64::MAX as u64),
            ),
        ] {
            assert_eq!(ok(text), want, "{text:?}");
        }
    }

    #[test]
    fn hostile_input_is_refused_with_a_reason() {
        assert_eq!(err(""), "the duration is empty");
        assert_eq!(err("-5s"), "a duration has no sign");
        assert_eq!(err("+5s"), "a duration has no sign");
        assert!(err("5").contains("a number needs a unit"), "{}", err("5"));
        assert!(err("1h5").contains("a number needs a unit"));
        assert!(err("s").contains("a unit must follow a number"));
        assert!(err("h1").contains("a unit must follow a number"));
        assert!(err(".s").contains("'.' must have a digit"));
        assert!(err(".").contains("'.' must have a digit"));
        assert!(err("1..5s").contains("a number needs a unit"));
        assert!(err("5x").contains("unknown unit \"x\""), "{}", err("5x"));
        assert!(err("5 s").contains("unknown unit \" s\""));
        assert!(err(" 5s").contains("a unit must follow a number"));
        assert!(err("5sec").contains("unknown unit \"sec\""));
        assert!(err("1d").contains("unknown unit \"d\""));
        assert!(err("5S").contains("unknown unit \"S\""));
        assert!(err("5s\n").contains("unknown unit \"s\\n\""));
        assert!(
            err("1e9h").contains("unknown unit \"e\""),
            "{}",
            err("1e9h")
        );
        assert!(err("１s").contains("a unit must follow a number"));
        // Overflow, in one number, in a product, in a sum.
        for long in [
            "9223372036854775808ns",
            "2562048h",
            "2562047h48m",
            "99999999999999999999999999999999999999999999s",
            "106751991167301d",
        ] {
            let e = err(long);
            assert!(
                e.contains("longer than") || e.contains("unknown unit"),
                "{long}: {e}"
            );
        }
        assert!(err("2562048h").contains("longer than Go can hold"));
        let many = "2562047h".repeat(2);
        assert!(err(&many).contains("longer than Go can hold"));
        // Long input: errors stay short and come back quickly.
        let e = err(&"1".repeat(100_000));
        assert!(e.contains("longer than"), "{e}");
        let e = err(&format!("1{}", "x".repeat(100_000)));
        assert!(e.len() < 200, "{e}");
        assert_eq!(ok(&"1s".repeat(50_000)), Duration::from_secs(50_000));
        assert_eq!(
            ok(&format!("1.{}s", "0".repeat(100_000))),
            Duration::from_secs(1)
        );
    }
}
