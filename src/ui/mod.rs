//! What people see: progress and human-readable numbers.

pub mod progress;
pub mod wizard;

/// Bytes in decimal units as disk vendors count them: "500.1 GB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut i = 0;
    // 999.95 would print as "1000.0": move to the next unit first.
    while v >= 999.95 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// A duration as "1:02:03" or "2:03".
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::human_bytes(999), "999 B");
        assert_eq!(super::human_bytes(500_107_862_016), "500.1 GB");
        assert_eq!(super::human_bytes(1000), "1.0 kB");
        assert_eq!(super::human_bytes(999_999_999), "1.0 GB");
        assert_eq!(super::human_bytes(2_000_398_934_016), "2.0 TB");
        assert_eq!(super::human_duration(3725.0), "1:02:05");
        assert_eq!(super::human_duration(65.0), "1:05");
    }
}
