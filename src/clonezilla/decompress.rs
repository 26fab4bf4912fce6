//! Decompression of Clonezilla's image files, by codec.
//!
//! Every codec reads what the usual tools write, including concatenated
//! streams: zstd frames, gzip members (pigz), xz streams, lz4 frames, bzip2
//! streams (pbzip2). All decoders are pure Rust except zstd (the `zstd`
//! crate's bundled C library), so the static build links.
//!
//! A decoder's errors are `io::Error`s; [`read_error`] turns one into the
//! crate's error, naming the piece and byte where reading stood.

use std::io::{self, BufRead, BufReader, Read};

use super::Codec;
use super::pieces::{PieceError, PiecePos};
use crate::error::{Error, Result};

/// Input buffer of every decoder: large reads from the image drive.
const INPUT_BUFFER: usize = 1 << 20;

/// A reader that decompresses `inner` as `codec` says (buffered: the
/// decoders read `inner` in 1 MiB requests).
pub fn decoder(codec: Codec, inner: impl Read + Send + 'static) -> Result<Box<dyn Read + Send>> {
    let buffered = BufReader::with_capacity(INPUT_BUFFER, inner);
    Ok(match codec {
        Codec::Zstd => {
            let d = zstd::stream::read::Decoder::with_buffer(buffered)
                .map_err(|e| Error::Corrupt(format!("cannot start the zstd decoder: {e}")))?;
            Box::new(d)
        }
        Codec::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Codec::Xz => Box::new(lzma_rust2::XzReader::new(buffered, true)),
        Codec::Lz4 => Box::new(MultiLz4(lz4_flex::frame::FrameDecoder::new(buffered))),
        Codec::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(buffered)),
        Codec::None => Box::new(buffered),
    })
}

/// lz4 frames one after another (the `lz4` tool decodes concatenated
/// frames as one stream; lz4_flex's decoder stops after each frame).
struct MultiLz4<R: BufRead>(lz4_flex::frame::FrameDecoder<R>);

impl<R: BufRead> Read for MultiLz4<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let n = self.0.read(buf)?;
            // 0 is the end of a frame: go on while input remains.
            if n > 0 || self.0.get_mut().fill_buf()?.is_empty() {
                return Ok(n);
            }
        }
    }
}

/// The codec whose magic number `first_bytes` starts with (give at least 6
/// bytes). `Some(Codec::None)` when the bytes are an uncompressed partclone
/// or ntfsclone image; `None` when nothing is recognised (an uncompressed
/// raw `dd-img` has no magic).
pub fn sniff(first_bytes: &[u8]) -> Option<Codec> {
    let b = first_bytes;
    if b.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        Some(Codec::Zstd)
    } else if b.starts_with(&[0x1F, 0x8B]) {
        Some(Codec::Gzip)
    } else if b.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Codec::Xz)
    } else if b.starts_with(&[0x04, 0x22, 0x4D, 0x18]) {
        Some(Codec::Lz4)
    } else if b.len() >= 4 && b.starts_with(b"BZh") && (b'1'..=b'9').contains(&b[3]) {
        Some(Codec::Bzip2)
    } else if b.starts_with(b"partclone-image") || b.starts_with(b"\0ntfsclone-image") {
        Some(Codec::None)
    } else {
        None
    }
}

/// Short name of a codec, for messages.
pub fn codec_name(codec: Codec) -> &'static str {
    match codec {
        Codec::Zstd => "zstd",
        Codec::Gzip => "gzip",
        Codec::Xz => "xz",
        Codec::Lz4 => "lz4",
        Codec::Bzip2 => "bzip2",
        Codec::None => "uncompressed",
    }
}

/// Turns a read failure of a decoded stream into the crate's error: `Io`
/// (or `Corrupt` for an empty piece) when the pieces themselves failed,
/// `Corrupt` naming the piece and byte otherwise (the compressed data is
/// damaged). `what` says what was being read ("partclone data block 12").
pub fn read_error(e: io::Error, pos: &PiecePos, what: &str) -> Error {
    if let Some(err) = PieceError::from_io(&e) {
        return err.with_note(&format!("while reading {what}"));
    }
    Error::Corrupt(format!("{pos}: the compressed data is damaged ({e}) while reading {what}"))
}

/// Reads into `buf` until it is full or the stream ends; returns the bytes
/// read. Errors carry the position `pos` and `what` was being read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8], pos: &PiecePos, what: &str) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read_error(e, pos, what)),
        }
    }
    Ok(done)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    /// Runs `cmd args` with `input` on stdin and returns stdout; panics (the
    /// test fails) when the tool is missing or fails.
    pub(crate) fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd} is needed by this test (apt-get install it): {e}"));
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(&input).unwrap();
        });
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(out.status.success(), "{cmd} {args:?} failed");
        out.stdout
    }

    /// Compresses `data` with the real command-line tool for `codec`, the
    /// way Clonezilla does (several streams where the tool makes them).
    pub(crate) fn compress(codec: Codec, data: &[u8]) -> Vec<u8> {
        match codec {
            Codec::Zstd => {
                // Two frames, the second from pzstd (which adds skippable
                // frames holding its frame sizes).
                let half = data.len() / 2;
                let mut v = pipe("zstd", &["-q", "-c", "-3", "-T2"], &data[..half]);
                v.extend(pipe("pzstd", &["-q", "-c", "-p", "2"], &data[half..]));
                v
            }
            // pigz with a small block size: several deflate blocks; plus a
            // second member appended.
            Codec::Gzip => {
                let half = data.len() / 2;
                let mut v = pipe("pigz", &["-c", "-b", "128"], &data[..half]);
                v.extend(pipe("gzip", &["-c"], &data[half..]));
                v
            }
            Codec::Xz => {
                let half = data.len() / 2;
                let mut v = pipe("xz", &["-c", "-1", "-T2"], &data[..half]);
                v.extend(pipe("xz", &["-c", "-1"], &data[half..]));
                v
            }
            Codec::Lz4 => {
                let half = data.len() / 2;
                let mut v = pipe("lz4", &["-q", "-c"], &data[..half]);
                v.extend(pipe("lz4", &["-q", "-c"], &data[half..]));
                v
            }
            Codec::Bzip2 => {
                // pbzip2 writes one bzip2 stream per 100 KB block.
                let half = data.len() / 2;
                let mut v = pipe("pbzip2", &["-c", "-1", "-b1", "-p2"], &data[..half]);
                v.extend(pipe("bzip2", &["-c", "-1"], &data[half..]));
                v
            }
            Codec::None => data.to_vec(),
        }
    }

    pub(crate) const ALL: [Codec; 6] = [Codec::Zstd, Codec::Gzip, Codec::Xz, Codec::Lz4, Codec::Bzip2, Codec::None];

    fn sample() -> Vec<u8> {
        let mut v = Vec::with_capacity(3 << 20);
        let mut x = 0x1234_5678u32;
        for i in 0..(3u32 << 20) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Compressible but not trivial.
            v.push(if i % 4096 < 2048 { (x % 7) as u8 } else { 0 });
        }
        v
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("klon-decompress-{name}-{}", std::process::id()))
    }

    fn decode_file(codec: Codec, path: &Path) -> Result<Vec<u8>> {
        let r = super::super::pieces::PieceReader::open(&[path.to_path_buf()])?;
        let pos = r.position();
        let mut d = decoder(codec, r)?;
        let mut out = Vec::new();
        d.read_to_end(&mut out).map_err(|e| read_error(e, &pos, "test data"))?;
        Ok(out)
    }

    #[test]
    fn every_codec_decodes_what_the_tools_write() {
        let data = sample();
        for codec in ALL {
            let packed = compress(codec, &data);
            if codec != Codec::None {
                assert_eq!(sniff(&packed), Some(codec));
            }
            let p = tmp(codec_name(codec));
            std::fs::write(&p, &packed).unwrap();
            let out = decode_file(codec, &p).unwrap();
            assert!(out == data, "{codec:?}: decoded data differs");
            std::fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn damaged_compressed_data_is_corrupt_naming_the_file() {
        let data = sample();
        for codec in ALL.into_iter().filter(|c| *c != Codec::None) {
            let packed = compress(codec, &data);
            let p = tmp(&format!("bad-{}", codec_name(codec)));
            // Flip a byte in the middle, truncate, append garbage: each must
            // fail (or, for a decoder without its own check, at least not
            // return the original data: the format layer then fails).
            let mut flipped = packed.clone();
            let mid = flipped.len() / 3;
            flipped[mid] ^= 0x55;
            let truncated = packed[..packed.len() * 2 / 3].to_vec();
            let mut garbage = packed.clone();
            garbage.extend_from_slice(b"garbage after the stream");
            let mut cases = vec![("flipped", flipped), ("truncated", truncated), ("garbage", garbage)];
            // Only the trailer missing: lz4_flex takes an end of input at a
            // block boundary as the end of the frame (all data is there; a
            // shorter stream is caught by the format's length checks).
            if codec != Codec::Lz4 {
                cases.push(("trailer cut", packed[..packed.len() - 7].to_vec()));
            }
            for (case, bytes) in cases {
                std::fs::write(&p, &bytes).unwrap();
                match decode_file(codec, &p) {
                    Err(e) => {
                        assert!(matches!(e, Error::Corrupt(_)), "{codec:?} {case}: {e}");
                        assert!(e.to_string().contains(p.file_name().unwrap().to_str().unwrap()), "{e}");
                    }
                    Ok(out) => assert!(out != data, "{codec:?} {case}: damage went unnoticed"),
                }
            }
            std::fs::remove_file(&p).unwrap();
        }
    }

    #[test]
    fn sniff_knows_the_magics() {
        assert_eq!(sniff(b"partclone-image\0"), Some(Codec::None));
        assert_eq!(sniff(b"\0ntfsclone-image"), Some(Codec::None));
        assert_eq!(sniff(b"BZh9"), Some(Codec::Bzip2));
        assert_eq!(sniff(b"BZh0"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(&[0u8; 16]), None);
    }
}
