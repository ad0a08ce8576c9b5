//! Random identifiers: bearer tokens, pod UIDs, sandbox IDs, cluster tokens.
//!
//! Tokens must be unguessable per cluster so that a test using one context's
//! credentials cannot accidentally pass with another's.

use crate::SimError;

/// `n` random bytes from the OS.
fn random_bytes(n: usize) -> Result<Vec<u8>, SimError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| SimError::Random(e.to_string()))?;
    Ok(buf)
}

/// A random number in `lo..=hi` (uniform enough for picking ports).
pub(crate) fn random_in(lo: u16, hi: u16) -> Result<u16, SimError> {
    let b = random_bytes(4)?;
    let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let span = u32::from(hi.saturating_sub(lo)) + 1;
    Ok(lo + (n % span) as u16)
}

/// `2 * n_bytes` lowercase hex characters.
pub(crate) fn random_hex(n_bytes: usize) -> Result<String, SimError> {
    Ok(random_bytes(n_bytes)?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A random RFC 4122 version-4 UUID, the format of `metadata.uid`.
pub(crate) fn uuid_v4() -> Result<String, SimError> {
    let mut b = random_bytes(16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}
