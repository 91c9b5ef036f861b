//! Kubernetes resource quantities as the bandwidth annotations use them
//! (`kubernetes.io/ingress-bandwidth: 10M`), in bits per second.

/// Parses a quantity such as `10M`, `1.5G`, `512Ki` or `100000` to a whole number.
pub fn parse_quantity(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err(format!("{s:?} is not a quantity"));
    }
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        other => return Err(format!("{s:?}: unknown suffix {other:?}")),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a quantity"))?;
    Ok((n * mult).ceil() as u64)
}

/// A bandwidth annotation's value, within kubelet's bounds (1k to 1P bits/s).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let v = parse_quantity(s)?;
    if !(1_000..=1_000_000_000_000_000).contains(&v) {
        return Err(format!("{s:?} is outside 1k..1P"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10M").unwrap(), 10_000_000);
        assert_eq!(parse_quantity("1.5k").unwrap(), 1500);
        assert_eq!(parse_quantity("2Mi").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_quantity("123").unwrap(), 123);
        assert!(parse_quantity("10X").is_err());
        assert!(parse_quantity("M").is_err());
        assert!(parse_bandwidth("10").is_err());
        assert!(parse_bandwidth("2P").is_err());
        assert_eq!(parse_bandwidth("1k").unwrap(), 1000);
    }
}
