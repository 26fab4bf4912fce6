//! Split pieces (`X.aa`, `X.ab`, ...) of one image file, read as one stream.
//!
//! Clonezilla splits large image files with `split -b`, which names the
//! pieces `.aa`, `.ab`, ... A [`PieceReader`] reads them one after another as
//! a single [`Read`], and a [`PiecePos`] handle tells where it is (which
//! piece, which byte of it) even after a decompressor has taken the reader:
//! errors further up name "sda1.ext4-ptcl-img.zst.ab at byte 123456".

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// Where a [`PieceReader`] is: a cheap, shareable handle (clone it before the
/// reader is handed to a decompressor).
#[derive(Clone)]
pub struct PiecePos {
    pieces: Arc<[PathBuf]>,
    /// Length of each piece when opened.
    lengths: Arc<[u64]>,
    /// The stream read above is the pieces' bytes themselves (no codec):
    /// positions in it map exactly onto the pieces.
    direct: bool,
    /// (index of the current piece, bytes consumed from it).
    state: Arc<Mutex<(usize, u64)>>,
}

impl PiecePos {
    /// A position that names `file` alone (for readers not fed by pieces,
    /// e.g. in tests).
    pub fn single(file: &Path) -> PiecePos {
        PiecePos {
            pieces: Arc::from(vec![file.to_path_buf()]),
            lengths: Arc::from(vec![u64::MAX]),
            direct: false,
            state: Arc::new(Mutex::new((0, 0))),
        }
    }

    /// The piece being read and the number of its bytes consumed so far.
    pub fn location(&self) -> (PathBuf, u64) {
        let (i, off) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        (self.pieces[i.min(self.pieces.len() - 1)].clone(), off)
    }

    /// The same position, marked as read without a codec: [`at`](Self::at)
    /// then names the exact piece and byte of a stream offset.
    pub fn uncompressed(mut self) -> PiecePos {
        self.direct = true;
        self
    }

    /// Where byte `stream_offset` of the stream read above is: exactly
    /// ("X.ab at byte 123") when the stream is uncompressed, else the
    /// compressed piece and how far the decoder has read in it (decoders
    /// read ahead, so the damage is at or before that byte).
    pub fn at(&self, stream_offset: u64) -> String {
        if self.direct {
            let (p, off) = self.piece_of(stream_offset);
            return format!("{} at byte {off}", p.display());
        }
        let (path, off) = self.location();
        format!("{} (compressed; read up to byte {off}) at image offset {stream_offset}", path.display())
    }

    /// The piece and byte holding `stream_offset` of an uncompressed image.
    fn piece_of(&self, stream_offset: u64) -> (&Path, u64) {
        let mut off = stream_offset;
        for (p, &len) in self.pieces.iter().zip(self.lengths.iter()) {
            if off < len {
                return (p, off);
            }
            off -= len;
        }
        let last = self.pieces.len() - 1;
        (&self.pieces[last], off + self.lengths[last])
    }

    /// Where `stream_offset` lies, for a second position in a message that
    /// names the file's directory already: `PIECE at byte N` (file name
    /// only) in an uncompressed image, `image offset N` in a compressed one.
    pub fn offset_only(&self, stream_offset: u64) -> String {
        if !self.direct {
            return format!("image offset {stream_offset}");
        }
        let (p, off) = self.piece_of(stream_offset);
        format!("{} at byte {off}", p.file_name().map_or(p.as_os_str(), |n| n).to_string_lossy())
    }

    /// The first piece (the file name a user recognises).
    pub fn first(&self) -> &Path {
        &self.pieces[0]
    }

    fn set(&self, index: usize, offset: u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (index, offset);
    }
}

impl fmt::Display for PiecePos {
    /// "sda1.ext4-ptcl-img.zst.ab at byte 123456" (file name only).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (path, off) = self.location();
        write!(f, "{} at byte {off}", path.display())
    }
}

impl fmt::Debug for PiecePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PiecePos({self})")
    }
}

/// An I/O failure of the pieces themselves (not of what is in them), carried
/// inside `io::Error` through decompressors so that [`PieceError::from_io`]
/// can turn it back into a precise [`Error`].
#[derive(Debug)]
pub struct PieceError {
    /// The piece.
    pub path: PathBuf,
    /// Byte offset in the piece.
    pub offset: u64,
    /// What went wrong.
    pub kind: PieceErrorKind,
}

/// What went wrong with a piece.
#[derive(Debug)]
pub enum PieceErrorKind {
    /// Opening or reading failed.
    Io(io::Error),
    /// A piece after the first is empty: the set is damaged.
    Empty,
}

impl fmt::Display for PieceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            PieceErrorKind::Io(e) => write!(f, "reading {} at byte {}: {e}", self.path.display(), self.offset),
            PieceErrorKind::Empty => {
                write!(f, "{} is empty (a piece of a split image is missing data)", self.path.display())
            }
        }
    }
}

impl std::error::Error for PieceError {}

impl PieceError {
    fn into_io(self) -> io::Error {
        let kind = match &self.kind {
            PieceErrorKind::Io(e) => e.kind(),
            PieceErrorKind::Empty => io::ErrorKind::UnexpectedEof,
        };
        io::Error::new(kind, self)
    }

    /// If `e` carries a [`PieceError`] (possibly through a decompressor),
    /// the crate error for it: `Io` for a failed read, `Corrupt` for an
    /// empty piece. `None` when `e` comes from elsewhere.
    pub fn from_io(e: &io::Error) -> Option<Error> {
        let pe = e.get_ref()?.downcast_ref::<PieceError>()?;
        Some(match &pe.kind {
            PieceErrorKind::Io(src) => {
                Error::io("reading image piece", &pe.path, Some(pe.offset), io::Error::new(src.kind(), src.to_string()))
            }
            PieceErrorKind::Empty => Error::Corrupt(pe.to_string()),
        })
    }
}

/// The pieces of one file, read one after another.
pub struct PieceReader {
    pieces: Arc<[PathBuf]>,
    index: usize,
    offset: u64,
    file: Option<File>,
    pos: PiecePos,
}

impl PieceReader {
    /// Opens `pieces` (at least one), in order. Every piece must exist, and
    /// when there are several, none may be empty.
    pub fn open(pieces: &[PathBuf]) -> Result<PieceReader> {
        if pieces.is_empty() {
            return Err(Error::Corrupt("a partition image has no file".into()));
        }
        let mut lengths = Vec::with_capacity(pieces.len());
        for p in pieces {
            let meta = std::fs::metadata(p).map_err(|e| Error::io("opening image piece", p, None, e))?;
            if !meta.is_file() {
                return Err(Error::Corrupt(format!("{} is not a regular file", p.display())));
            }
            if meta.len() == 0 && pieces.len() > 1 {
                return Err(Error::Corrupt(format!(
                    "{} is empty (a piece of a split image is missing data)",
                    p.display()
                )));
            }
            lengths.push(meta.len());
        }
        let pieces: Arc<[PathBuf]> = Arc::from(pieces.to_vec());
        let file = File::open(&pieces[0]).map_err(|e| Error::io("opening image piece", &pieces[0], None, e))?;
        let pos = PiecePos {
            pieces: pieces.clone(),
            lengths: Arc::from(lengths),
            direct: false,
            state: Arc::new(Mutex::new((0, 0))),
        };
        Ok(PieceReader { pieces, index: 0, offset: 0, file: Some(file), pos })
    }

    /// A handle that tells where this reader is, also after it was moved
    /// into a decompressor.
    pub fn position(&self) -> PiecePos {
        self.pos.clone()
    }

    fn err(&self, kind: PieceErrorKind) -> io::Error {
        PieceError { path: self.pieces[self.index].clone(), offset: self.offset, kind }.into_io()
    }
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(file) = self.file.as_mut() else { return Ok(0) };
            let n = match file.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.err(PieceErrorKind::Io(e))),
            };
            if n > 0 {
                self.offset += n as u64;
                self.pos.set(self.index, self.offset);
                return Ok(n);
            }
            // End of this piece: on to the next one, if any.
            if self.index + 1 >= self.pieces.len() {
                self.file = None;
                return Ok(0);
            }
            if self.offset == 0 && self.pieces.len() > 1 {
                // Emptied since open() checked it.
                return Err(self.err(PieceErrorKind::Empty));
            }
            self.index += 1;
            self.offset = 0;
            self.pos.set(self.index, 0);
            match File::open(&self.pieces[self.index]) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    self.file = None;
                    return Err(self.err(PieceErrorKind::Io(e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pieces(dir: &Path, data: &[u8], size: usize) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (i, chunk) in data.chunks(size).enumerate() {
            let name = format!("img.a{}", (b'a' + i as u8) as char);
            let p = dir.join(name);
            std::fs::write(&p, chunk).unwrap();
            out.push(p);
        }
        out
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("klon-pieces-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_pieces_in_order_and_tracks_position() {
        let d = tmpdir("order");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let pieces = write_pieces(&d, &data, 3000);
        let mut r = PieceReader::open(&pieces).unwrap();
        let pos = r.position();
        let mut out = Vec::new();
        let mut buf = [0u8; 777];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if out.len() == 777 * 5 {
                // 3885 bytes: 3000 of .aa, then 885 of .ab.
                assert_eq!(pos.location(), (pieces[1].clone(), 885));
                assert!(pos.to_string().ends_with("img.ab at byte 885"), "{pos}");
            }
        }
        assert_eq!(out, data);
        assert_eq!(pos.location(), (pieces[3].clone(), 1000));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_or_empty_middle_piece_is_an_error() {
        let d = tmpdir("missing");
        let pieces = write_pieces(&d, &[1u8; 9000], 3000);
        std::fs::remove_file(&pieces[1]).unwrap();
        let e = PieceReader::open(&pieces).err().unwrap();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("img.ab"), "{e}");

        std::fs::write(&pieces[1], b"").unwrap();
        let e = PieceReader::open(&pieces).err().unwrap();
        assert!(matches!(e, Error::Corrupt(_)), "{e}");
        assert!(e.to_string().contains("img.ab"), "{e}");

        // Emptied after opening: the read fails, naming the piece.
        std::fs::write(&pieces[1], [2u8; 10]).unwrap();
        let mut r = PieceReader::open(&pieces).unwrap();
        std::fs::write(&pieces[1], b"").unwrap();
        let mut v = Vec::new();
        let e = r.read_to_end(&mut v).unwrap_err();
        let e = PieceError::from_io(&e).unwrap();
        assert!(e.to_string().contains("img.ab"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
