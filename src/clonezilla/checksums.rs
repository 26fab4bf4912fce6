//! Checksum files Clonezilla may write beside the image: MD5SUMS, SHA1SUMS,
//! B2SUMS (`ocs-sr -gm`, `-gs`, `-gb`: `md5sum * > MD5SUMS` and so on, run
//! in the image directory once the image is complete), and B3SUMS (b3sum's
//! identical format) should one be there.
//!
//! Lines are GNU coreutils' format: `<hex>  <file>` (or `<hex> *<file>`); a
//! line starting with a backslash has `\\` and `\n` escaped in the name.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use md5::Digest;

use crate::error::{Error, Result, io_ctx};

/// The checksum file names this module understands, in the order they are
/// checked.
pub const FILE_NAMES: [&str; 4] = ["MD5SUMS", "SHA1SUMS", "B2SUMS", "B3SUMS"];

/// Largest checksum file read (a line per image file: far below this).
const MAX_SUMS_FILE: u64 = 16 << 20;
/// Read size while hashing.
const BUF: usize = 1 << 20;

/// A hash being computed.
enum Hasher {
    Md5(md5::Md5),
    Sha1(sha1::Sha1),
    Blake2b512(blake2::Blake2b512),
    Blake2b256(blake2::Blake2b256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// The hasher for checksum file `name` giving `hex_len` hex digits.
    fn new(name: &str, hex_len: usize) -> Option<Hasher> {
        match (name, hex_len) {
            ("MD5SUMS", 32) => Some(Hasher::Md5(md5::Md5::new())),
            ("SHA1SUMS", 40) => Some(Hasher::Sha1(sha1::Sha1::new())),
            // b2sum's default, 512 bits, and `b2sum -l 256`.
            ("B2SUMS", 128) => Some(Hasher::Blake2b512(blake2::Blake2b512::new())),
            ("B2SUMS", 64) => Some(Hasher::Blake2b256(blake2::Blake2b256::new())),
            ("B3SUMS", 64) => Some(Hasher::Blake3(Box::new(blake3::Hasher::new()))),
            _ => None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => Digest::update(h, data),
            Hasher::Sha1(h) => Digest::update(h, data),
            Hasher::Blake2b512(h) => Digest::update(h, data),
            Hasher::Blake2b256(h) => Digest::update(h, data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    fn hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Md5(h) => h.finalize().to_vec(),
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Blake2b512(h) => h.finalize().to_vec(),
            Hasher::Blake2b256(h) => h.finalize().to_vec(),
            Hasher::Blake3(h) => h.finalize().as_bytes().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One line: (hex digest in lower case, file name).
fn parse_line(line: &str) -> Option<(String, String)> {
    let (escaped, line) = match line.strip_prefix('\\') {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (hex, rest) = line.split_once(' ')?;
    let name = rest.strip_prefix(' ').or_else(|| rest.strip_prefix('*'))?;
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) || name.is_empty() {
        return None;
    }
    let name = if escaped {
        let mut out = String::new();
        let mut chars = name.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next()? {
                    '\\' => out.push('\\'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    _ => return None,
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        name.to_string()
    };
    Some((hex.to_ascii_lowercase(), name))
}

/// Hashes `path` with `hasher`, in large reads.
fn hash_file(path: &Path, mut hasher: Hasher) -> Result<String> {
    let mut f = File::open(path).map_err(io_ctx("opening", path, None))?;
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("reading", path, Some(pos), e)),
        };
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.hex())
}

/// Checks every line of the checksum file `file` against the files of
/// `dir`; returns the number of files checked. A mismatch or a missing
/// file is `Error::Corrupt` naming the file.
///
/// `file` is a path, or a name within `dir`; its name (MD5SUMS, SHA1SUMS,
/// B2SUMS or B3SUMS) says the algorithm. Names in it must be plain file
/// names in `dir` (no directories).
pub fn check_file(dir: &Path, file: &Path) -> Result<usize> {
    let path: PathBuf = if file.components().count() == 1 { dir.join(file) } else { file.to_path_buf() };
    let kind = path.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
    if !FILE_NAMES.contains(&kind.as_str()) {
        return Err(Error::Unsupported(format!(
            "{}: not a checksum file klon knows (expected one of {})",
            path.display(),
            FILE_NAMES.join(", ")
        )));
    }
    let meta = std::fs::metadata(&path).map_err(io_ctx("reading", &path, None))?;
    if meta.len() > MAX_SUMS_FILE {
        return Err(Error::Corrupt(format!(
            "{}: {} bytes is too large for a checksum file",
            path.display(),
            meta.len()
        )));
    }
    let f = File::open(&path).map_err(io_ctx("opening", &path, None))?;
    let mut checked = 0;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                Error::Corrupt(format!("{} line {}: not UTF-8 text", path.display(), i + 1))
            } else {
                Error::io("reading", &path, None, e)
            }
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = || Error::Corrupt(format!("{} line {}: not a `<hex>  <file>` line: {line:?}", path.display(), i + 1));
        let (hex, name) = parse_line(&line).ok_or_else(bad)?;
        if name.contains('/') || name == "." || name == ".." {
            return Err(Error::Corrupt(format!(
                "{} line {}: {name:?} is not a file of the image directory",
                path.display(),
                i + 1
            )));
        }
        let hasher = Hasher::new(&kind, hex.len()).ok_or_else(|| {
            Error::Corrupt(format!("{} line {}: {} hex digits do not fit {kind}", path.display(), i + 1, hex.len()))
        })?;
        let target = dir.join(&name);
        match std::fs::metadata(&target) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(Error::Corrupt(format!(
                    "{kind} lists {name}, which is not a regular file in {}",
                    dir.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Corrupt(format!("{kind} lists {name}, which is missing from {}", dir.display())));
            }
            Err(e) => return Err(Error::io("reading", &target, None, e)),
        }
        let got = hash_file(&target, hasher)?;
        if got != hex {
            return Err(Error::Corrupt(format!(
                "{name} does not match its checksum in {kind} (expected {hex}, computed {got}): the file is damaged"
            )));
        }
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, TempDir, run};

    /// Files written by coreutils' own tools check; a changed byte, a
    /// missing file and a malformed line are refused naming the file.
    #[test]
    fn coreutils_sums() {
        let t = TempDir::new("cz-sums");
        let mut rng = Rng::seeded(3);
        std::fs::write(t.join("a.img"), rng.bytes(3 << 20)).unwrap();
        std::fs::write(t.join("b back\\slash"), b"x").unwrap();
        std::fs::write(t.join("c"), b"").unwrap();
        for (tool, out) in [("md5sum", "MD5SUMS"), ("sha1sum", "SHA1SUMS"), ("b2sum", "B2SUMS")] {
            let text = run(std::process::Command::new(tool).current_dir(&t.0).args(["a.img", "b back\\slash", "c"]));
            std::fs::write(t.join(out), text).unwrap();
            assert_eq!(check_file(&t.0, Path::new(out)).unwrap(), 3, "{out}");
        }
        let short = run(std::process::Command::new("b2sum").current_dir(&t.0).args(["-l", "256", "-b", "c"]));
        std::fs::write(t.join("B2SUMS"), short).unwrap();
        assert_eq!(check_file(&t.0, &t.join("B2SUMS")).unwrap(), 1);
        std::fs::write(t.join("B3SUMS"), format!("{}  c\n", blake3::hash(b""))).unwrap();
        assert_eq!(check_file(&t.0, Path::new("B3SUMS")).unwrap(), 1);

        let mut data = std::fs::read(t.join("a.img")).unwrap();
        data[2 << 20] ^= 1;
        std::fs::write(t.join("a.img"), data).unwrap();
        let e = check_file(&t.0, Path::new("SHA1SUMS")).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("a.img does not match"), "{e}");
        std::fs::remove_file(t.join("a.img")).unwrap();
        let e = check_file(&t.0, Path::new("MD5SUMS")).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)) && e.to_string().contains("a.img, which is missing"), "{e}");
        std::fs::write(t.join("MD5SUMS"), "nothex  c\n").unwrap();
        let e = check_file(&t.0, Path::new("MD5SUMS")).unwrap_err();
        assert!(e.to_string().contains("MD5SUMS line 1"), "{e}");
        std::fs::write(t.join("MD5SUMS"), "d41d8cd98f00b204e9800998ecf8427e  ../c\n").unwrap();
        assert!(check_file(&t.0, Path::new("MD5SUMS")).is_err());
    }
}
