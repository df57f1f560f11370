//! Random bytes from the operating system (`getrandom(2)`), for every
//! podvisor crate that needs them (tokens, secrets, ids, a clone's RNG
//! seed). A failure is an error; nothing here ever hands out zeros or a
//! guess in place of random bytes.

/// The operating system gave no random bytes.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random source failed")]
pub struct RandomError(#[source] getrandom::Error);

/// Fills `buf` with random bytes.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(RandomError)
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomError> {
    let mut bytes = vec![0u8; n];
    fill_random(&mut bytes)?;
    Ok(bytes)
}

/// `n` random bytes as `2 * n` lowercase hex digits.
pub fn random_hex(n: usize) -> Result<String, RandomError> {
    use std::fmt::Write;
    let bytes = random_bytes(n)?;
    let mut hex = String::with_capacity(2 * n);
    for b in bytes {
        write!(hex, "{b:02x}").expect("writing to a String succeeds");
    }
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_has_two_digits_per_byte_and_differs_between_calls() {
        let (a, b) = (random_hex(16).unwrap(), random_hex(16).unwrap());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        // 128 random bits: equal (or all zeros) only if the source is broken.
        assert_ne!(a, b);
        assert_ne!(a, "0".repeat(32));
    }

    #[test]
    fn bytes_have_the_asked_length() {
        assert_eq!(random_bytes(0).unwrap().len(), 0);
        let bytes = random_bytes(64).unwrap();
        assert_eq!(bytes.len(), 64);
        assert!(bytes.iter().any(|&b| b != 0));
    }
}
