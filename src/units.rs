//! Numbers as people read them: sizes in IEC units, durations.

/// Bytes in IEC units, as lsblk and fdisk show them: "465.8 GiB" (exact
/// bytes are in every --json).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut i = 0;
    // 1023.95 would print as "1024.0": move to the next unit first.
    while v >= 1023.95 && i < UNITS.len() - 1 {
        v /= 1024.0;
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
        assert_eq!(super::human_bytes(1023), "1023 B");
        assert_eq!(super::human_bytes(1024), "1.0 KiB");
        // A "500 GB" disk, as lsblk shows it.
        assert_eq!(super::human_bytes(500_107_862_016), "465.8 GiB");
        assert_eq!(super::human_bytes((1 << 30) - 1), "1.0 GiB");
        assert_eq!(super::human_bytes(2_000_398_934_016), "1.8 TiB");
        assert_eq!(super::human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(super::human_duration(3725.0), "1:02:05");
        assert_eq!(super::human_duration(65.0), "1:05");
    }
}
