//! Sizes and times as people write and read them.

/// Parse a size: a decimal number of bytes with an optional binary unit: `k`, `M`,
/// `G`, `T`, `P`, `E` (case-insensitive, optionally followed by `iB` or `B`; all
/// powers of 1024) or `s` (512-byte sectors). `512`, `64k`, `64KiB`, `1G`, `10GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    if num.is_empty() {
        return Err(format!(
            "\"{s}\" is not a size: write a number of bytes with an optional unit (512, 64k, 64KiB, 1G, 10GiB)"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("\"{s}\" is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "s" => 9,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        other => return Err(unknown_unit(other, s)),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("\"{s}\" is too large (more than 2^64 bytes)"))
}

fn unknown_unit(unit: &str, s: &str) -> String {
    format!(
        "unknown unit \"{unit}\" in \"{s}\": use k, M, G, T or P (powers of 1024) or s (sectors), e.g. 64k or 10GiB"
    )
}

/// Parse `ID=SIZE` (`pool adopt --size`).
pub fn parse_id_size(s: &str) -> Result<(u32, u64), String> {
    let (id, size) = s.split_once('=').ok_or_else(|| format!("\"{s}\": expected ID=SIZE, e.g. 0=10GiB"))?;
    let id: u32 = id.trim().parse().map_err(|_| format!("\"{id}\" is not a device id (0..=16777215)"))?;
    if id > 16_777_215 {
        return Err(format!("device id {id} is out of range (0..=16777215)"));
    }
    Ok((id, parse_size(size)?))
}

/// A byte count for people: `0 B`, `512 B`, `64 KiB`, `1.5 GiB` (one decimal at most).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let div = 1u64 << (10 * unit);
    let tenths = ((u128::from(bytes) * 10 + u128::from(div) / 2) / u128::from(div)) as u64;
    if tenths % 10 == 0 {
        format!("{} {}", tenths / 10, UNITS[unit])
    } else {
        format!("{}.{} {}", tenths / 10, tenths % 10, UNITS[unit])
    }
}

/// Unix seconds as RFC 3339 UTC (`2024-11-23T01:42:00Z`).
pub fn format_time(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_bytes_and_binary_units() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("8s"), Ok(4096));
        assert_eq!(parse_size(" 3 MB "), Ok(3 << 20));
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        for bad in ["", "k", "-1", "1.5G", "10X", "99999999999999999999", "16E", "1Gi B"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn id_sizes_are_parsed() {
        assert_eq!(parse_id_size("3=1G"), Ok((3, 1 << 30)));
        assert!(parse_id_size("3").is_err());
        assert!(parse_id_size("x=1G").is_err());
        assert!(parse_id_size("16777216=1G").is_err());
    }

    #[test]
    fn sizes_print_with_binary_units() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_732_326_120), "2024-11-23T01:42:00Z");
    }
}
