//! Sizes with units, read (`--max-size 20GiB`) and shown (`1.5 GiB`).

/// Bytes from `20GiB`, `500MB`, `1.5T`, `4096`: a number (decimals allowed) and a unit,
/// case-insensitive. `KiB`, `MiB`, `GiB`, `TiB` and the bare `K`, `M`, `G`, `T` are powers
/// of 1024 (as `du -h` shows them); `KB`, `MB`, `GB`, `TB` powers of 1000; no unit or `B`
/// is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 20GiB, 500MB, 1.5T)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB, or KB, MB, GB, TB)"
            ));
        }
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is not a size greater than zero"));
    }
    Ok(bytes as u64)
}

/// `512 B`, `1.5 KiB`, `20.0 GiB`: powers of 1024, one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A size as `--bytes` asks: exact bytes, or human.
pub fn shown(bytes: u64, exact: bool) -> String {
    if exact {
        bytes.to_string()
    } else {
        human(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("20 gib"), Ok(20 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("12 parsecs").unwrap_err().contains("unit"));
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1e30T").is_err());
    }

    #[test]
    fn sizes_show_in_powers_of_1024() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(u64::MAX), "16384.0 PiB");
        assert_eq!(shown(1536, true), "1536");
    }
}

/// Property tests of `--max-size`'s parser: any text, no panic; a size written with a unit
/// is read back.
#[cfg(test)]
mod outside_input {
    use proptest::prelude::*;

    use super::parse_size;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_text_is_a_size_or_an_error(text in "\\PC{0,30}") {
            if let Ok(bytes) = parse_size(&text) {
                prop_assert!(bytes >= 1);
            }
        }

        #[test]
        fn sizes_with_units_are_read_back(n in 1u64..1 << 20) {
            prop_assert_eq!(parse_size(&format!("{n}KiB")), Ok(n << 10));
            prop_assert_eq!(parse_size(&format!("{n} MB")), Ok(n * 1_000_000));
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }
    }
}
