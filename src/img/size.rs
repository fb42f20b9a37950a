//! Sizes as qemu-img spells them: a number with an optional binary suffix (k/K, M, G, T,
//! P, E; b/B for bytes), case-insensitive, with an optional decimal fraction ("1.5G").

use crate::error::{Error, Result};

/// Parse `text` into bytes. Fractions must come out as a whole number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |why: &str| Error::invalid(format!("invalid size '{text}': {why}"));
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    if number.is_empty() {
        return Err(bad("expected a number"));
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad("unknown suffix (use k, M, G, T, P or E)")),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err(bad("expected a number"));
    }
    let unit: u64 = 1 << shift;
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad("number too large"))?
    };
    let mut bytes = whole
        .checked_mul(unit)
        .ok_or_else(|| bad("size too large"))?;
    if !fraction.is_empty() {
        // Exact decimal arithmetic: fraction_digits / 10^n * unit must be a whole number.
        if fraction.len() > 18 {
            return Err(bad("too many decimal places"));
        }
        let numerator: u128 = fraction.parse().map_err(|_| bad("expected a number"))?;
        let denominator = 10u128.pow(fraction.len() as u32);
        let scaled = numerator * u128::from(unit);
        if !scaled.is_multiple_of(denominator) {
            return Err(bad("not a whole number of bytes"));
        }
        let extra = u64::try_from(scaled / denominator).map_err(|_| bad("size too large"))?;
        bytes = bytes
            .checked_add(extra)
            .ok_or_else(|| bad("size too large"))?;
    }
    // qemu keeps sizes in a signed 64-bit integer.
    if bytes > i64::MAX as u64 {
        return Err(bad("size too large"));
    }
    Ok(bytes)
}

/// A size for people, in qemu-img info's style: "1 GiB", "1.5 MiB", "512 B".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512b").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("3T").unwrap(), 3 << 40);
        assert_eq!(parse_size("1P").unwrap(), 1 << 50);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size(".5k").unwrap(), 512);
    }

    #[test]
    fn rejects_bad_sizes() {
        for bad in [
            "",
            "G",
            "1X",
            "1.2.3",
            "8E",
            "99999999999999999999",
            "0.3b",
            "-1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
        assert_eq!(human_size(2 << 40), "2 TiB");
    }
}
