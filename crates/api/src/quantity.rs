//! Resource quantities as Kubernetes writes them: CPU as `500m`, `1`, `0.5`
//! (millicores) and memory as `256Mi`, `1Gi`, `512M`, `1e9` (bytes).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A quantity as the user wrote it (`"500m"`, `"1Gi"`, `2`). It is kept as
/// text, as Kubernetes does; [`Quantity::millicores`] and
/// [`Quantity::bytes`] read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = String, example = "500m"))]
pub struct Quantity(pub String);

/// A quantity that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} quantity {text:?}: {reason}")]
pub struct QuantityError {
    /// `cpu` or `memory`.
    pub kind: &'static str,
    pub text: String,
    pub reason: String,
}

impl Quantity {
    pub fn new(text: impl Into<String>) -> Quantity {
        Quantity(text.into())
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// CPU in millicores: `500m` → 500, `1` → 1000, `0.25` → 250.
    pub fn millicores(&self) -> Result<u64, QuantityError> {
        let err = |reason: &str| QuantityError {
            kind: "cpu",
            text: self.0.clone(),
            reason: reason.to_string(),
        };
        let text = self.0.trim();
        let (number, scale) = match text.strip_suffix('m') {
            Some(n) => (n, 1u128),
            None => (text, 1000u128),
        };
        let (mantissa, decimals) = parse_decimal(number).map_err(|r| err(&r))?;
        let value = scale_down(mantissa * scale, decimals)
            .ok_or_else(|| err("finer than 1m (a thousandth of a CPU)"))?;
        u64::try_from(value).map_err(|_| err("too large"))
    }

    /// Memory in bytes: `256Mi`, `1Gi`, `512M`, `1e9`, `1000`.
    pub fn bytes(&self) -> Result<u64, QuantityError> {
        let err = |reason: &str| QuantityError {
            kind: "memory",
            text: self.0.clone(),
            reason: reason.to_string(),
        };
        let text = self.0.trim();
        const SUFFIXES: [(&str, u128); 13] = [
            ("Ki", 1 << 10),
            ("Mi", 1 << 20),
            ("Gi", 1 << 30),
            ("Ti", 1 << 40),
            ("Pi", 1 << 50),
            ("Ei", 1 << 60),
            ("k", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
            ("T", 1_000_000_000_000),
            ("P", 1_000_000_000_000_000),
            ("E", 1_000_000_000_000_000_000),
            ("", 1),
        ];
        let (number, multiplier) = SUFFIXES
            .iter()
            .find_map(|(suffix, m)| text.strip_suffix(suffix).map(|n| (n, *m)))
            .unwrap_or((text, 1));
        if let Some(pos) = number.find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E') {
            return Err(err(&format!(
                "unknown suffix {:?} (use Ki, Mi, Gi, Ti, or k, M, G, T)",
                &text[pos..]
            )));
        }
        let (mantissa, decimals) = parse_decimal(number).map_err(|r| err(&r))?;
        let value = mantissa
            .checked_mul(multiplier)
            .ok_or_else(|| err("too large"))?;
        let value =
            scale_down(value, decimals).ok_or_else(|| err("not a whole number of bytes"))?;
        u64::try_from(value).map_err(|_| err("too large"))
    }

    /// A CPU quantity for `millicores`, written as Kubernetes would.
    pub fn from_millicores(millicores: u64) -> Quantity {
        if millicores.is_multiple_of(1000) {
            Quantity(format!("{}", millicores / 1000))
        } else {
            Quantity(format!("{millicores}m"))
        }
    }

    /// A memory quantity for `bytes`, in the largest binary unit that
    /// divides it.
    pub fn from_bytes(bytes: u64) -> Quantity {
        Quantity(format_bytes(bytes))
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `bytes` in the largest binary unit that divides it exactly (`256Mi`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (suffix, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{suffix}", bytes / size);
        }
    }
    bytes.to_string()
}

/// `"1.25"` → (125, 2); `"3e2"` → (300, 0). Non-negative only.
fn parse_decimal(text: &str) -> Result<(u128, u32), String> {
    if text.is_empty() {
        return Err("no number".into());
    }
    let (base, exponent) = match text.split_once(['e', 'E']) {
        Some((base, exp)) => {
            let exp: u32 = exp
                .parse()
                .map_err(|_| format!("invalid exponent {exp:?}"))?;
            if exp > 30 {
                return Err("too large".into());
            }
            (base, exp)
        }
        None => (text, 0),
    };
    let (int, frac) = base.split_once('.').unwrap_or((base, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(if base.starts_with('-') {
            "must not be negative".into()
        } else {
            "not a number".into()
        });
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err("too large".into());
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| "not a number".to_string())?
    };
    let decimals = frac.len() as u32;
    // Apply the exponent: first against the decimals, then multiply.
    if exponent >= decimals {
        let factor = 10u128.checked_pow(exponent - decimals).ok_or("too large")?;
        Ok((mantissa.checked_mul(factor).ok_or("too large")?, 0))
    } else {
        Ok((mantissa, decimals - exponent))
    }
}

/// `value / 10^decimals` if exact, else `None`.
fn scale_down(value: u128, decimals: u32) -> Option<u128> {
    let divisor = 10u128.checked_pow(decimals)?;
    value.is_multiple_of(divisor).then_some(value / divisor)
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a quantity such as 500m, 1, 256Mi or 1Gi")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(s: &str) -> Result<u64, String> {
        Quantity::new(s).millicores().map_err(|e| e.to_string())
    }
    fn mem(s: &str) -> Result<u64, String> {
        Quantity::new(s).bytes().map_err(|e| e.to_string())
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(cpu("500m"), Ok(500));
        assert_eq!(cpu("1"), Ok(1000));
        assert_eq!(cpu("2"), Ok(2000));
        assert_eq!(cpu("0.5"), Ok(500));
        assert_eq!(cpu("1.25"), Ok(1250));
        assert_eq!(cpu("100m"), Ok(100));
        assert_eq!(cpu("1e1"), Ok(10_000));
        assert!(cpu("0.0001").unwrap_err().contains("finer than 1m"));
        assert!(cpu("-1").unwrap_err().contains("negative"));
        assert!(cpu("abc").unwrap_err().contains("cpu quantity \"abc\""));
        assert!(cpu("").unwrap_err().contains("no number"));
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(mem("256Mi"), Ok(256 << 20));
        assert_eq!(mem("1Gi"), Ok(1 << 30));
        assert_eq!(mem("512M"), Ok(512_000_000));
        assert_eq!(mem("1e9"), Ok(1_000_000_000));
        assert_eq!(mem("1000"), Ok(1000));
        assert_eq!(mem("1.5Gi"), Ok(3 << 29));
        assert_eq!(mem("128k"), Ok(128_000));
        assert!(mem("1K").unwrap_err().contains("unknown suffix \"K\""));
        assert!(mem("1.5").unwrap_err().contains("whole number"));
        assert!(mem("Mi").unwrap_err().contains("no number"));
        assert!(mem("99999999999Ei").unwrap_err().contains("too large"));
    }

    #[test]
    fn formatting_round_trips() {
        assert_eq!(format_bytes(256 << 20), "256Mi");
        assert_eq!(format_bytes(1 << 30), "1Gi");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(Quantity::from_millicores(1500).as_str(), "1500m");
        assert_eq!(Quantity::from_millicores(2000).as_str(), "2");
        for b in [1u64, 1024, 3 << 29, 512_000_000] {
            assert_eq!(Quantity::from_bytes(b).bytes(), Ok(b));
        }
    }
}
