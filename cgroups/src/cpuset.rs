//! The kernel's CPU/memory-node list format (`0-3,5,7-8`).

use std::collections::BTreeSet;

/// Parses a list like `0-3,5`; the message says what is wrong.
pub fn parse_list(s: &str) -> Result<BTreeSet<u32>, String> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',') {
        let part = part.trim();
        let num = |v: &str| {
            v.parse::<u32>()
                .map_err(|_| format!("{v:?} in {s:?} is not a number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("range {part:?} in {s:?} is backwards"));
                }
                if b - a > 65_536 {
                    return Err(format!("range {part:?} in {s:?} is too large"));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(part)?);
            }
        }
    }
    Ok(out)
}

/// This host's online CPUs (`/sys/devices/system/cpu/online`), if readable.
pub fn online_cpus() -> Option<BTreeSet<u32>> {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_list(&s).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists() {
        assert_eq!(
            parse_list("0-2,5").unwrap().into_iter().collect::<Vec<_>>(),
            vec![0, 1, 2, 5]
        );
        assert_eq!(parse_list("1\n").unwrap().len(), 1);
        assert!(parse_list("").is_err());
        assert!(parse_list("3-1").is_err());
        assert!(parse_list("a").is_err());
        assert!(parse_list("0,,1").is_err());
    }
}
