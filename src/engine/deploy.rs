//! `klon deploy` and `klon receive`: one image to many machines at once by
//! multicast, on udpcast (udp-sender and udp-receiver, what Clonezilla SE
//! and FOG use). The sender sends a klon image as one stream (see
//! docs/DEPLOY.md); each receiver restores it onto its disk while it
//! arrives, with every check of a local restore — each chunk record checked
//! against its index entry and its content against its blake3 before it is
//! written, everything read back afterwards — and reports the outcome to
//! the sender, which prints who got what.
//!
//! The stream: the manifest, its checksum and every index first (checked as
//! when an image is opened), then every chunk record, in the order a
//! restore writes them. A receiver keeps each chunk's header (for the
//! read-back) and the few records that touch the disk's first and last MiB
//! (the table areas, compared byte by byte after they are written).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::restore::{self, RestoreOptions, RestoreReport};
use super::source::klon::KlonImage;
use super::target::{WIPE_LEN, check_fits, write_order};
use crate::device::Disk;
use crate::engine::feedback::Feedback;
use crate::error::{Error, Result};
use crate::image::ChunkStore;
use crate::image::format::{ChunkHeader, IndexEntry};
use crate::image::manifest::{MANIFEST_NAME, MANIFEST_SUM_NAME, Manifest};
use crate::image::reader::{ImageReader, StoredChunk};

/// The stream's first bytes.
const MAGIC: &[u8] = b"KLONSTREAM 1\n";
/// Frame kinds: a file of the image's directory, a chunk record, the end
/// of the files, the end of the stream.
const FILE: u8 = b'F';
const CHUNK: u8 = b'C';
const FILES_DONE: u8 = b'D';
const END: u8 = b'E';
/// Longest file a stream carries whole (a manifest or an index).
const MAX_FILE: u64 = 1 << 30;
/// The sender listens for reports (and late joiners' probes) at udpcast's
/// port base plus this.
pub const REPORT_PORT_OFFSET: u16 = 8;
/// With `--late`, the sender serves the stream by unicast (TCP) at the
/// port base plus this.
pub const LATE_PORT_OFFSET: u16 = 9;
/// What a receiver sends to find the sender's state.
const PROBE: &[u8] = b"KLON-PROBE 1\n";
/// udpcast's default port base.
pub const DEFAULT_PORT: u16 = 9000;

/// Writes one frame.
fn frame(out: &mut dyn Write, kind: u8, name: &str, body: &[u8]) -> std::io::Result<()> {
    let name = name.as_bytes();
    out.write_all(&[kind])?;
    out.write_all(&(name.len() as u16).to_le_bytes())?;
    out.write_all(name)?;
    out.write_all(&(body.len() as u64).to_le_bytes())?;
    out.write_all(body)
}

/// Reads a frame's head: kind, name and body length.
fn frame_head(input: &mut dyn Read, from: &str) -> Result<(u8, String, u64)> {
    let cut = |e: std::io::Error| {
        Error::Corrupt(format!("{from}: the stream ended or failed before its end ({e}): the sender stopped?"))
    };
    let mut head = [0u8; 3];
    input.read_exact(&mut head).map_err(cut)?;
    let mut name = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
    input.read_exact(&mut name).map_err(cut)?;
    let mut len = [0u8; 8];
    input.read_exact(&mut len).map_err(cut)?;
    let name = String::from_utf8(name).map_err(|_| Error::Corrupt(format!("{from}: a frame's name is not text")))?;
    Ok((head[0], name, u64::from_le_bytes(len)))
}

/// Writes the stream of the klon image at `image` to `out`.
pub fn send_stream(image: &Path, out: &mut dyn Write) -> Result<u64> {
    let img = KlonImage::open(image)?;
    let m = img.manifest();
    let io = |e: std::io::Error| Error::io("sending the stream of", image, None, e);
    out.write_all(MAGIC).map_err(io)?;
    let mut names = vec![MANIFEST_NAME.to_string(), MANIFEST_SUM_NAME.to_string()];
    names.extend(m.streams.iter().map(|s| s.index.name.clone()));
    for name in &names {
        let path = image.join(name);
        let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, None, e))?;
        frame(out, FILE, name, &bytes).map_err(io)?;
    }
    frame(out, FILES_DONE, "", &[]).map_err(io)?;
    let mut sent = 0u64;
    for si in write_order(&m.streams) {
        img.for_each_chunk(si, &mut |c| {
            super::cancel::check("deploy")?;
            frame(out, CHUNK, &format!("{si} {}", c.header.seq), c.record()).map_err(io)?;
            sent += c.record().len() as u64;
            Ok(true)
        })?;
    }
    frame(out, END, "", &[]).map_err(io)?;
    out.flush().map_err(io)?;
    Ok(sent)
}

/// An image arriving as a stream: its manifest and indexes (in a directory
/// of their own), then its chunk records as a restore asks for them.
pub struct StreamedImage {
    reader: ImageReader,
    indexes: Vec<Vec<IndexEntry>>,
    input: Mutex<Box<dyn Read + Send>>,
    from: String,
    /// Per stream, the header of each chunk that went by (the read-back's).
    headers: Mutex<Vec<Vec<ChunkHeader>>>,
    /// The records of chunks that touch the table areas.
    kept: Mutex<HashMap<(usize, u64), Vec<u8>>>,
    dir: PathBuf,
}

impl std::fmt::Debug for StreamedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamedImage").field("from", &self.from).finish()
    }
}

impl StreamedImage {
    /// Reads the stream's head from `input` (`from` names the sender in
    /// messages): its files go into `dir` (created), and the manifest and
    /// every index are checked as when an image directory is opened.
    pub fn open(mut input: Box<dyn Read + Send>, from: &str, dir: &Path) -> Result<StreamedImage> {
        let mut magic = vec![0u8; MAGIC.len()];
        input.read_exact(&mut magic).map_err(|e| Error::Corrupt(format!("{from}: no stream arrived ({e})")))?;
        if magic != MAGIC {
            return Err(Error::Corrupt(format!("{from}: this is not a klon image stream (version 1)")));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, None, e))?;
        loop {
            let (kind, name, len) = frame_head(&mut input, from)?;
            match kind {
                FILES_DONE => break,
                FILE if len <= MAX_FILE && is_plain_name(&name) => {
                    let mut bytes = vec![0u8; len as usize];
                    input
                        .read_exact(&mut bytes)
                        .map_err(|e| Error::Corrupt(format!("{from}: {name} cut short ({e})")))?;
                    let path = dir.join(&name);
                    std::fs::write(&path, bytes).map_err(|e| Error::io("writing", &path, None, e))?;
                }
                _ => {
                    return Err(Error::Corrupt(format!(
                        "{from}: unexpected frame {:?} {name:?} in the stream's head",
                        kind as char
                    )));
                }
            }
        }
        let reader = ImageReader::open_without_data(dir)?;
        super::verify::stored_total(dir, &reader.manifest.streams)?;
        let indexes = reader.indexes()?;
        let headers = Mutex::new(vec![Vec::new(); indexes.len()]);
        Ok(StreamedImage {
            reader,
            indexes,
            input: Mutex::new(input),
            from: from.to_string(),
            headers,
            kept: Mutex::new(HashMap::new()),
            dir: dir.to_path_buf(),
        })
    }

    /// Reads the end of the stream (after the last chunk).
    pub fn finish(&self) -> Result<()> {
        let mut input = self.input.lock().expect("stream lock");
        match frame_head(&mut *input, &self.from)? {
            (END, _, 0) => Ok(()),
            (kind, name, _) => Err(Error::Corrupt(format!(
                "{}: frame {:?} {name:?} where the stream should end",
                self.from, kind as char
            ))),
        }
    }

    /// Whether chunk extents touch the disk's first or last MiB.
    fn in_table_areas(&self, header: &ChunkHeader) -> bool {
        let size = self.reader.manifest.layout.disk_size;
        let areas = [(0, WIPE_LEN.min(size)), (size.saturating_sub(WIPE_LEN), size)];
        header.extents.iter().any(|&(a, l)| areas.iter().any(|&(s, e)| a < e && s < a + l))
    }
}

impl Drop for StreamedImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file name with no directory part.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && name != "." && name != ".."
}

impl ChunkStore for StreamedImage {
    fn location(&self) -> &Path {
        Path::new(&self.from)
    }

    fn manifest(&self) -> &Manifest {
        &self.reader.manifest
    }

    fn chunk_count(&self, stream: usize) -> usize {
        self.indexes[stream].len()
    }

    fn for_each_chunk(&self, stream: usize, each: &mut dyn FnMut(StoredChunk) -> Result<bool>) -> Result<()> {
        let mut input = self.input.lock().expect("stream lock");
        for (seq, e) in self.indexes[stream].iter().enumerate() {
            let seq = seq as u64;
            let (kind, name, len) = frame_head(&mut *input, &self.from)?;
            if kind != CHUNK || name != format!("{stream} {seq}") || len != e.record_len() {
                return Err(Error::Corrupt(format!(
                    "{}: frame {:?} {name:?} ({len} bytes) where chunk {seq} of stream {stream} ({} bytes) should come",
                    self.from,
                    kind as char,
                    e.record_len()
                )));
            }
            let mut record = Vec::new();
            let chunk = self.reader.record_from(stream, seq, e, &self.from, |buf| {
                input.read_exact(buf).map_err(|err| {
                    Error::Corrupt(format!("{}: chunk {seq} of stream {stream} cut short ({err})", self.from))
                })?;
                record.extend_from_slice(buf);
                Ok(())
            })?;
            self.headers.lock().expect("headers lock")[stream].push(chunk.header.clone());
            if self.in_table_areas(&chunk.header) {
                self.kept.lock().expect("kept lock").insert((stream, seq), record);
            }
            if !each(chunk)? {
                break;
            }
        }
        Ok(())
    }

    fn read_chunk(&self, stream: usize, seq: u64) -> Result<StoredChunk> {
        let kept = self.kept.lock().expect("kept lock");
        let record = kept.get(&(stream, seq)).ok_or_else(|| {
            Error::Unsupported(format!("{}: chunk {seq} of stream {stream} went by and was not kept", self.from))
        })?;
        let e = &self.indexes[stream][seq as usize];
        self.reader.record_from(stream, seq, e, &self.from, |buf| {
            buf.copy_from_slice(record);
            Ok(())
        })
    }

    fn read_header(&self, stream: usize, seq: u64) -> Result<ChunkHeader> {
        self.headers.lock().expect("headers lock")[stream].get(seq as usize).cloned().ok_or_else(|| {
            Error::Unsupported(format!("{}: chunk {seq} of stream {stream} has not arrived yet", self.from))
        })
    }
}

/// What a receiver tells the sender when it is done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// Its host name.
    pub host: String,
    /// The disk it wrote (path, model, serial).
    pub disk: String,
    /// Its network interface's MAC address.
    pub mac: String,
    /// Whether the restore (and its read-back) succeeded.
    pub ok: bool,
    /// What went wrong, when not.
    pub problem: Option<String>,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The address it reported from (filled in by the sender).
    #[serde(default)]
    pub ip: String,
}

/// Options of `klon receive`.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The network interface udp-receiver listens on.
    pub interface: Option<String>,
    /// udpcast's port base.
    pub port: u16,
    /// How the target is written.
    pub restore: RestoreOptions,
}

/// `klon receive TARGET --multicast`: waits for a sender, restores the
/// image it sends onto `target` and reports the outcome to the sender.
/// A machine that comes when the multicast is already under way, or loses
/// it half-way, gets the image by unicast when the sender serves late
/// joiners (`klon deploy --late`). The caller has confirmed (`--yes`).
pub fn receive(target: &Path, opts: &ReceiveOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let dir = crate::scratch::dir("receive");
    let late = |answer: &Option<(String, ProbeAnswer)>| match answer {
        Some((ip, ProbeAnswer { phase: Phase::Sending | Phase::Done, late_port: Some(p), .. })) => {
            Some((ip.clone(), *p))
        }
        _ => None,
    };
    let (result, sender) = match late(&probe(opts.interface.as_deref(), opts.port, Duration::from_millis(1500))) {
        Some((ip, p)) => {
            opts.restore.feedback.note(&format!("the deployment from {ip} is under way: the image comes by unicast"));
            (by_unicast(target, opts, &ip, p, &dir), Some(ip))
        }
        None => {
            let (result, sender, fallback) = by_multicast(target, opts, &dir);
            let retry = match &result {
                Err(e) if fallback || e.to_string().contains("the stream ended or failed") => {
                    late(&probe(opts.interface.as_deref(), opts.port, Duration::from_millis(1500)))
                }
                _ => None,
            };
            match retry {
                Some((ip, p)) => {
                    opts.restore.feedback.note(&format!(
                        "{}; the image comes again from {ip} by unicast",
                        result.as_ref().err().map(|e| e.to_string()).unwrap_or_default()
                    ));
                    (by_unicast(target, opts, &ip, p, &dir), Some(ip))
                }
                None => (result, sender),
            }
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let outcome = Outcome {
        host: crate::repo::lock::hostname(),
        disk: describe_disk(target),
        mac: opts.interface.as_deref().map(mac_of).unwrap_or_default(),
        ok: result.is_ok(),
        problem: result.as_ref().err().map(|e| e.to_string()),
        bytes_written: result.as_ref().map_or(0, |r| r.bytes_written),
        seconds: started.elapsed().as_secs_f64(),
        ip: String::new(),
    };
    if let Some(s) = sender {
        let _ = report_to(&s, opts.port, &outcome);
    }
    result
}

/// Restores the stream `input` (from `from`) onto `target`, with the
/// checks of a local restore; its head goes into `dir`.
fn restore_stream(
    input: Box<dyn Read + Send>,
    from: &str,
    target: &Path,
    opts: &ReceiveOptions,
    dir: &Path,
) -> Result<RestoreReport> {
    let image = StreamedImage::open(input, from, dir)?;
    let layout = &image.manifest().layout;
    let mut disk = Disk::open_target(target, Some(layout.disk_size))?;
    check_fits(&mut disk, layout.disk_size, layout.sector_size)?;
    crate::device::safety::check_target(&disk, None, None)?;
    disk.enable_direct_reads();
    let report = restore::restore(&image, &disk, &opts.restore)?;
    image.finish()?;
    Ok(report)
}

/// The whole stream from the sender at `ip` by TCP on `port`.
fn by_unicast(target: &Path, opts: &ReceiveOptions, ip: &str, port: u16, dir: &Path) -> Result<RestoreReport> {
    let _ = std::fs::remove_dir_all(dir);
    let conn = std::net::TcpStream::connect((ip, port))
        .map_err(|e| Error::Unsupported(format!("cannot reach {ip}'s unicast stream on TCP port {port}: {e}")))?;
    restore_stream(
        Box::new(BufReader::with_capacity(1 << 20, conn)),
        &format!("{ip}'s unicast stream"),
        target,
        opts,
        dir,
    )
}

/// How long the multicast may bring nothing before the receiver asks the
/// sender whether it dropped this machine.
const STALL: Duration = Duration::from_secs(10);

/// A reader that notes when it last gave bytes (milliseconds since `since`).
struct Noting<R> {
    inner: R,
    since: Instant,
    last: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: Read> Read for Noting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.last.store(self.since.elapsed().as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(n)
    }
}

/// The stream by multicast with udp-receiver. Returns the result, the
/// sender's address once connected, and whether another way is worth
/// trying: this machine never got into the multicast (a deployment went
/// on without it), or udp-sender dropped it.
fn by_multicast(target: &Path, opts: &ReceiveOptions, dir: &Path) -> (Result<RestoreReport>, Option<String>, bool) {
    let mut args = vec!["--nokbd".to_string(), "--portbase".into(), opts.port.to_string()];
    if let Some(i) = &opts.interface {
        args.extend(["--interface".into(), i.clone()]);
    }
    opts.restore.feedback.detail(1, || format!("running udp-receiver {}", args.join(" ")));
    let mut child = match Command::new("udp-receiver")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return (Err(Error::Unsupported(format!("cannot run udp-receiver ({e}): install udpcast"))), None, false);
        }
    };
    let sender: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let said: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped");
    let watch = {
        let (sender, said, feedback) = (sender.clone(), said.clone(), opts.restore.feedback.clone());
        std::thread::spawn(move || {
            for line in udpcast_lines(stderr) {
                feedback.detail(2, || format!("udp-receiver: {line}"));
                // "Connected as #0 to 10.77.0.1"
                if let Some(at) = line.find("Connected as #").and_then(|i| line[i..].find(" to ").map(|j| i + j + 4)) {
                    *sender.lock().expect("sender lock") = line[at..].split_whitespace().next().map(String::from);
                }
                said.lock().expect("said lock").push(line);
            }
        })
    };
    // While not connected: is a deployment going on without this machine?
    // Then stop waiting for it when it serves late joiners. Once connected:
    // when nothing arrives for a while, did udp-sender drop this machine?
    let left_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let since = Instant::now();
    let last_byte = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let prober = {
        let (sender, left_out, dropped, done, last_byte) =
            (sender.clone(), left_out.clone(), dropped.clone(), done.clone(), last_byte.clone());
        let (interface, port, pid) = (opts.interface.clone(), opts.port, child.id() as i32);
        let feedback = opts.restore.feedback.clone();
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            let kill = || {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            };
            let mut said_so = false;
            while !done.load(SeqCst) {
                let connected = sender.lock().expect("sender lock").is_some();
                let quiet_for = since.elapsed().saturating_sub(Duration::from_millis(last_byte.load(SeqCst)));
                if connected && quiet_for > STALL {
                    if let Some((_, a)) = probe(interface.as_deref(), port, Duration::from_millis(500))
                        && a.dropped
                    {
                        dropped.store(true, SeqCst);
                        kill();
                        return;
                    }
                } else if !connected
                    && let Some((ip, a)) = probe(interface.as_deref(), port, Duration::from_millis(500))
                    && a.phase != Phase::Waiting
                    && sender.lock().expect("sender lock").is_none()
                {
                    if a.late_port.is_some() {
                        left_out.store(true, SeqCst);
                        kill();
                        return;
                    }
                    if !said_so {
                        feedback.note(&format!(
                            "a deployment from {ip} is under way without this machine, and it serves no late joiners \
                             (klon deploy --late): waiting for the next one"
                        ));
                        said_so = true;
                    }
                }
                for _ in 0..20 {
                    if done.load(SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    let stdout = child.stdout.take().expect("piped");
    let noting = Noting { inner: stdout, since, last: last_byte };
    let input: Box<dyn Read + Send> = Box::new(BufReader::with_capacity(1 << 20, noting));
    let result = restore_stream(input, "the multicast stream", target, opts, dir);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if result.is_err() {
        // The sender drops a receiver that stops answering.
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = watch.join();
    let _ = prober.join();
    let left_out = left_out.load(std::sync::atomic::Ordering::SeqCst);
    let dropped = dropped.load(std::sync::atomic::Ordering::SeqCst);
    let result = result.map_err(|e| {
        if dropped {
            return Error::Unsupported(format!(
                "udp-sender dropped this machine half-way (it stopped answering for too long; {e})"
            ));
        }
        let said = said.lock().expect("said lock");
        let tail: Vec<&String> = said.iter().rev().take(2).collect();
        if matches!(e, Error::Corrupt(_)) && !tail.is_empty() && !left_out {
            e.with_note(&format!(
                "udp-receiver said: {}",
                tail.iter().rev().map(|s| s.as_str()).collect::<Vec<_>>().join(" / ")
            ))
        } else {
            e
        }
    });
    let sender = sender.lock().expect("sender lock").clone();
    if result.is_ok()
        && let Ok(s) = &status
        && !s.success()
    {
        let e = Error::Unsupported(format!("udp-receiver failed ({s}) after the image arrived whole"));
        return (Err(e), sender, false);
    }
    (result, sender, left_out || dropped)
}

/// Asks the sender where its deployment is (a broadcast on the report
/// port, on `interface`'s network when given); waits up to `wait`.
fn probe(interface: Option<&str>, port: u16, wait: Duration) -> Option<(String, ProbeAnswer)> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_broadcast(true).ok()?;
    let to = interface.and_then(broadcast_of).unwrap_or(std::net::Ipv4Addr::BROADCAST);
    socket.send_to(PROBE, (to, port + REPORT_PORT_OFFSET)).ok()?;
    socket.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; 1024];
    let (n, from) = socket.recv_from(&mut buf).ok()?;
    let answer = serde_json::from_slice(&buf[..n]).ok()?;
    Some((from.ip().to_string(), answer))
}

/// What udp-sender or udp-receiver says on `stderr`, one message at a
/// time, trimmed, as soon as it is said: udpcast ends its messages with
/// `\n` and its progress with `\r`, so a message is yielded at either. A
/// message held back until the next progress line (up to a second) would
/// have the sender tell a late joiner that a deployment already sending
/// has not begun.
fn udpcast_lines(stderr: impl Read) -> impl Iterator<Item = String> {
    let mut reader = BufReader::new(stderr);
    let mut pending: Vec<u8> = Vec::new();
    let mut ready = std::collections::VecDeque::new();
    std::iter::from_fn(move || {
        loop {
            if let Some(line) = ready.pop_front() {
                return Some(line);
            }
            let got = match reader.fill_buf() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok([]) | Err(_) => {
                    let last = String::from_utf8_lossy(&std::mem::take(&mut pending)).trim().to_string();
                    return (!last.is_empty()).then_some(last);
                }
                Ok(got) => got,
            };
            let n = got.len();
            for &b in got {
                if b == b'\r' || b == b'\n' {
                    let line = String::from_utf8_lossy(&std::mem::take(&mut pending)).trim().to_string();
                    if !line.is_empty() {
                        ready.push_back(line);
                    }
                } else {
                    pending.push(b);
                }
            }
            reader.consume(n);
        }
    })
}

/// The IPv4 broadcast address of network interface `iface`.
fn broadcast_of(iface: &str) -> Option<std::net::Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        (a.interface_name == iface).then_some(())?;
        a.broadcast?.as_sockaddr_in().map(|b| b.ip())
    })
}

/// Sends `outcome` to the sender at `ip`, a few times (UDP may lose one).
fn report_to(ip: &str, port: u16, outcome: &Outcome) -> std::io::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let msg = serde_json::to_vec(outcome).expect("an outcome serializes");
    for _ in 0..3 {
        socket.send_to(&msg, (ip, port + REPORT_PORT_OFFSET))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The target as a report names it: its path, and model and serial when
/// it is a disk.
fn describe_disk(target: &Path) -> String {
    let disk = crate::inventory::list_disks().ok().and_then(|ds| ds.into_iter().find(|d| d.path == target));
    match disk.map(|d| (d.model, d.serial)) {
        None | Some((None, None)) => target.display().to_string(),
        Some((m, s)) => format!(
            "{} ({}{})",
            target.display(),
            m.unwrap_or_default(),
            s.map(|s| format!(", serial {s}")).unwrap_or_default()
        ),
    }
}

/// The MAC address of network interface `iface`.
fn mac_of(iface: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/class/net").join(iface).join("address"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Options of `klon deploy`.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// The network interface udp-sender sends on.
    pub interface: Option<String>,
    /// udpcast's port base.
    pub port: u16,
    /// Start once this many receivers have joined.
    pub clients: Option<u32>,
    /// Start at most this many seconds after the first receiver joined.
    pub wait: Option<u32>,
    /// udp-sender's --max-bitrate (e.g. 100m).
    pub max_bitrate: Option<String>,
    /// How long to wait for the receivers' reports after sending.
    pub report_wait: Duration,
    /// Serve machines that join late (or lose the multicast) by unicast,
    /// until this long after the multicast ended.
    pub late: Option<Duration>,
    /// Where progress, warnings and notes go.
    pub feedback: Feedback,
}

/// Where a deployment is, as the sender answers a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Waiting for receivers to join the multicast.
    Waiting,
    /// Sending by multicast; new receivers cannot join it.
    Sending,
    /// The multicast is over.
    Done,
}

/// The sender's answer to a probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeAnswer {
    /// Where the deployment is.
    pub phase: Phase,
    /// The TCP port of the unicast stream, when the sender serves late joiners.
    pub late_port: Option<u16>,
    /// Whether udp-sender dropped the machine that asked (it stopped
    /// answering for too long).
    #[serde(default)]
    pub dropped: bool,
}

/// One receiver in the sender's summary.
#[derive(Debug, Clone, Serialize)]
pub struct Receiver {
    /// Its address.
    pub ip: String,
    /// Whether it got the image by unicast (it joined late or lost the multicast).
    pub unicast: bool,
    /// What it reported, or None when it sent nothing.
    pub outcome: Option<Outcome>,
}

/// What `klon deploy` reports: each receiver that joined and what it said.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    /// Chunk bytes sent.
    pub bytes_sent: u64,
    /// Seconds from start to the last report.
    pub seconds: f64,
    /// Per receiver that joined: its outcome, or None when it sent none.
    pub receivers: Vec<Receiver>,
}

impl DeployReport {
    /// Whether every receiver restored the image and said so.
    pub fn all_ok(&self) -> bool {
        !self.receivers.is_empty() && self.receivers.iter().all(|r| r.outcome.as_ref().is_some_and(|o| o.ok))
    }

    /// The summary's lines.
    pub fn text(&self) -> String {
        let mut lines = vec![format!(
            "Sent {} to {} machines; {} s from start to the last report:",
            crate::units::human_bytes(self.bytes_sent),
            self.receivers.len(),
            (self.seconds * 10.0).round() / 10.0
        )];
        for r in &self.receivers {
            let ip = if r.unicast { format!("{} (late, by unicast)", r.ip) } else { r.ip.clone() };
            lines.push(match &r.outcome {
                Some(o) if o.ok => format!(
                    "  {ip} ({}, {}): OK, {} written to {} in {:.1} s, read back and compared",
                    o.host,
                    o.mac,
                    crate::units::human_bytes(o.bytes_written),
                    o.disk,
                    o.seconds
                ),
                Some(o) => format!(
                    "  {ip} ({}, {}): FAILED on {}: {}",
                    o.host,
                    o.mac,
                    o.disk,
                    o.problem.as_deref().unwrap_or("(no reason given)")
                ),
                None => format!("  {ip}: FAILED: no report (it stopped, or lost the connection)"),
            });
        }
        lines.join("\n")
    }
}

fn lock(st: &Mutex<SenderState>) -> std::sync::MutexGuard<'_, SenderState> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the sender's helper threads share: the phase, the reports, the
/// late joiners.
#[derive(Debug)]
struct SenderState {
    phase: Phase,
    got: HashMap<String, Outcome>,
    late: Vec<String>,
    /// The receivers udp-sender dropped.
    dropped: Vec<String>,
    /// Late joiners are still accepted.
    accepting: bool,
    /// The report listener is to end.
    stop: bool,
}

/// `klon deploy IMAGE --multicast`: sends the klon image at `image` to the
/// receivers that join, serves late joiners by unicast when asked, then
/// collects every receiver's report.
pub fn deploy(image: &Path, opts: &DeployOptions) -> Result<DeployReport> {
    let started = Instant::now();
    // Checked before anyone waits for it.
    drop(KlonImage::open(image)?);
    let reports = UdpSocket::bind(("0.0.0.0", opts.port + REPORT_PORT_OFFSET)).map_err(|e| {
        Error::Unsupported(format!("cannot listen for reports on UDP port {}: {e}", opts.port + REPORT_PORT_OFFSET))
    })?;
    let late_port = opts.port + LATE_PORT_OFFSET;
    let late_listener =
        match opts.late {
            None => None,
            Some(_) => Some(std::net::TcpListener::bind(("0.0.0.0", late_port)).map_err(|e| {
                Error::Unsupported(format!("cannot listen for late joiners on TCP port {late_port}: {e}"))
            })?),
        };
    let state = Arc::new(Mutex::new(SenderState {
        phase: Phase::Waiting,
        got: HashMap::new(),
        late: Vec::new(),
        dropped: Vec::new(),
        accepting: true,
        stop: false,
    }));
    // Reports and probes, on the report port, all along.
    let listener = {
        let state = state.clone();
        let offer = late_listener.as_ref().map(|_| late_port);
        let feedback = opts.feedback.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            let _ = reports.set_read_timeout(Some(Duration::from_millis(200)));
            loop {
                if lock(&state).stop {
                    return;
                }
                let Ok((n, from)) = reports.recv_from(&mut buf) else { continue };
                if buf[..n].starts_with(PROBE) {
                    let (phase, dropped) = {
                        let st = lock(&state);
                        (st.phase, st.dropped.contains(&from.ip().to_string()))
                    };
                    let answer =
                        serde_json::to_vec(&ProbeAnswer { phase, late_port: offer, dropped }).expect("serializes");
                    let _ = reports.send_to(&answer, from);
                } else if let Ok(mut o) = serde_json::from_slice::<Outcome>(&buf[..n]) {
                    o.ip = from.ip().to_string();
                    let mut st = lock(&state);
                    if !st.got.contains_key(&o.ip) {
                        feedback.note(&format!("{} reported: {}", o.ip, if o.ok { "OK" } else { "FAILED" }));
                    }
                    st.got.insert(o.ip.clone(), o);
                }
            }
        })
    };
    // Late joiners: the whole stream by TCP, each in a thread of its own.
    if let Some(l) = &late_listener {
        let l = l.try_clone().map_err(|e| Error::Unsupported(format!("TCP port {late_port}: {e}")))?;
        let (state, image, feedback) = (state.clone(), image.to_path_buf(), opts.feedback.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let ip = conn.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
                if !lock(&state).accepting {
                    return;
                }
                lock(&state).late.push(ip.clone());
                feedback.note(&format!("{ip} joined late: sending it the image by unicast"));
                let (image, feedback) = (image.clone(), feedback.clone());
                std::thread::spawn(move || {
                    let mut out = std::io::BufWriter::with_capacity(1 << 20, conn);
                    if let Err(e) = send_stream(&image, &mut out) {
                        feedback.warn(&format!("the unicast stream to {ip} stopped: {e}"));
                    }
                });
            }
        });
    }
    let mut args = vec![
        "--nokbd".to_string(),
        "--portbase".into(),
        opts.port.to_string(),
        "--retries-until-drop".into(),
        "30".into(),
    ];
    if let Some(i) = &opts.interface {
        args.extend(["--interface".into(), i.clone()]);
    }
    if let Some(n) = opts.clients {
        args.extend(["--min-receivers".into(), n.to_string()]);
    }
    if let Some(w) = opts.wait {
        args.extend(["--max-wait".into(), w.to_string()]);
    }
    if let Some(r) = &opts.max_bitrate {
        args.extend(["--max-bitrate".into(), r.clone()]);
    }
    opts.feedback.detail(1, || format!("running udp-sender {}", args.join(" ")));
    let mut child = Command::new("udp-sender")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Unsupported(format!("cannot run udp-sender ({e}): install udpcast")))?;
    let joined: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped");
    let watch = {
        let (joined, state, feedback) = (joined.clone(), state.clone(), opts.feedback.clone());
        std::thread::spawn(move || {
            // udpcast numbers its receivers: "#0" is the first that joined.
            let mut numbers: HashMap<String, String> = HashMap::new();
            for line in udpcast_lines(stderr) {
                feedback.detail(2, || format!("udp-sender: {line}"));
                // "Dropping client #1 because of timeout"
                if let Some(rest) = line.strip_prefix("Dropping client ")
                    && let Some(ip) = rest.split_whitespace().next().and_then(|n| numbers.get(n))
                {
                    lock(&state).dropped.push(ip.clone());
                    feedback.note(&format!("udp-sender dropped {ip} (it stopped answering)"));
                }
                // "New connection from 10.77.0.2  (#0) 00000009"
                if let Some(rest) = line.strip_prefix("New connection from ")
                    && let Some(ip) = rest.split_whitespace().next()
                {
                    if let Some(n) = rest.split(['(', ')']).nth(1) {
                        numbers.insert(n.to_string(), ip.to_string());
                    }
                    joined.lock().expect("joined lock").push(ip.to_string());
                    feedback.note(&format!("{ip} joined"));
                }
                if line.starts_with("Starting transfer") {
                    lock(&state).phase = Phase::Sending;
                }
            }
        })
    };
    let mut stdin = child.stdin.take().expect("piped");
    let sent = send_stream(image, &mut stdin);
    drop(stdin);
    let status = child.wait().map_err(|e| Error::Unsupported(format!("udp-sender: {e}")))?;
    let _ = watch.join();
    lock(&state).phase = Phase::Done;
    let stop_accepting = |state: &Arc<Mutex<SenderState>>| {
        let was = std::mem::replace(&mut lock(state).accepting, false);
        // The accept loop wakes on a connection.
        if was && late_listener.is_some() {
            let _ = std::net::TcpStream::connect(("127.0.0.1", late_port));
        }
    };
    let finish = |state: &Arc<Mutex<SenderState>>| {
        stop_accepting(state);
        lock(state).stop = true;
    };
    let bytes_sent = match sent {
        Ok(n) => n,
        Err(e) if !status.success() => {
            finish(&state);
            let _ = listener.join();
            return Err(e.with_note(&format!("udp-sender stopped ({status}): no receiver joined, or all were dropped")));
        }
        Err(e) => {
            finish(&state);
            let _ = listener.join();
            return Err(e);
        }
    };
    let joined = joined.lock().expect("joined lock").clone();
    if let Some(late) = opts.late {
        opts.feedback.note(&format!("multicast done; serving late joiners by unicast for {} s", late.as_secs()));
    }
    let late_until = Instant::now() + opts.late.unwrap_or_default();
    loop {
        let now = Instant::now();
        let all_in = {
            let st = lock(&state);
            joined.iter().chain(st.late.iter()).all(|ip| st.got.contains_key(ip))
        };
        if now >= late_until {
            stop_accepting(&state);
            if all_in || now >= late_until + opts.report_wait {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    finish(&state);
    let _ = listener.join();
    let mut st = lock(&state);
    let late = std::mem::take(&mut st.late);
    // A machine that lost the multicast and came back by unicast is listed
    // once, as a unicast one.
    let mut receivers: Vec<Receiver> = joined
        .into_iter()
        .filter(|ip| !late.contains(ip))
        .map(|ip| Receiver { outcome: st.got.remove(&ip), ip, unicast: false })
        .collect();
    for ip in late {
        receivers.push(Receiver { outcome: st.got.remove(&ip), ip, unicast: true });
    }
    Ok(DeployReport { bytes_sent, seconds: started.elapsed().as_secs_f64(), receivers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backup::{BackupOptions, backup};
    use crate::testutil::{Rng, TempDir};

    const MIB: u64 = 1 << 20;

    /// A disk without a table (one raw stream), its image, and the image
    /// as a stream.
    fn streamed(t: &TempDir) -> (Vec<u8>, Vec<u8>) {
        let (src, img) = (t.join("src.img"), t.join("image"));
        let mut disk = vec![0u8; (12 * MIB) as usize];
        let mut rng = Rng::seeded(3);
        disk[..(5 * MIB) as usize].copy_from_slice(&rng.bytes((5 * MIB) as usize));
        disk[(9 * MIB) as usize..(10 * MIB) as usize].copy_from_slice(&rng.bytes(MIB as usize));
        std::fs::write(&src, &disk).unwrap();
        backup(&src, &img, &BackupOptions { level: 1, feedback: Feedback::silent(), workers: 2, ..Default::default() })
            .unwrap();
        let mut stream = Vec::new();
        send_stream(&img, &mut stream).unwrap();
        (disk, stream)
    }

    fn restore_from(t: &TempDir, stream: Vec<u8>, name: &str) -> (PathBuf, Result<RestoreReport>) {
        let dst = t.join(name);
        let result = (|| {
            let image =
                StreamedImage::open(Box::new(std::io::Cursor::new(stream)), "the test stream", &t.join("head"))?;
            let mut disk = Disk::open_target(&dst, Some(image.manifest().layout.disk_size))?;
            check_fits(&mut disk, image.manifest().layout.disk_size, 512)?;
            let opts =
                RestoreOptions { grow_last: false, verify_after: true, feedback: Feedback::silent(), workers: 2 };
            let r = restore::restore(&image, &disk, &opts)?;
            image.finish()?;
            Ok(r)
        })();
        (dst, result)
    }

    #[test]
    fn a_streamed_image_restores_byte_for_byte() {
        let t = TempDir::new("stream-ok");
        let (disk, stream) = streamed(&t);
        let (dst, r) = restore_from(&t, stream, "dst.img");
        assert!(r.unwrap().verified);
        assert!(std::fs::read(dst).unwrap() == disk, "the restored disk differs from the source");
    }

    #[test]
    fn a_damaged_stream_is_caught_and_nothing_is_left_that_passes_for_a_disk() {
        let t = TempDir::new("stream-bad");
        let (_, stream) = streamed(&t);
        // Not a stream at all.
        let (dst, r) = restore_from(&t, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "a.img");
        assert!(matches!(r, Err(Error::Corrupt(ref m)) if m.contains("not a klon image stream")), "{r:?}");
        assert!(!dst.exists(), "a target was made before the stream was read");
        // A byte flipped in the last chunk's payload: its checksum fails
        // before the chunk is written; the restore cleans up.
        let mut bad = stream.clone();
        let at = bad.len() - 11 - 100; // before the end frame (11 bytes)
        bad[at] ^= 0x55;
        let (dst, r) = restore_from(&t, bad, "b.img");
        assert!(matches!(r, Err(Error::Corrupt(_))), "{r:?}");
        assert!(!dst.exists(), "the restore's own target file was kept after a failure");
        // Cut short in the middle of the chunks.
        let (dst, r) = restore_from(&t, stream[..stream.len() / 2].to_vec(), "c.img");
        assert!(matches!(r, Err(Error::Corrupt(ref m)) if m.contains("cut short") || m.contains("ended")), "{r:?}");
        assert!(!dst.exists());
        // A forged head: a file name with a directory part.
        let mut forged = MAGIC.to_vec();
        frame(&mut forged, FILE, "../klon.json", b"{}").unwrap();
        let (_, r) = restore_from(&t, forged, "d.img");
        assert!(matches!(r, Err(Error::Corrupt(ref m)) if m.contains("unexpected frame")), "{r:?}");
        assert!(!t.join("klon.json").exists());
    }

    /// udpcast's messages end with `\n`, its progress with `\r`: each is
    /// yielded as soon as it ends, not when the next `\r` comes.
    #[test]
    fn udpcast_messages_are_seen_as_soon_as_they_end() {
        let said = b"Udp-sender 20120424\nStarting transfer: 00000009\nbytes=  1 244 880 \rbytes=  2 531 984 \r\n\
                     Transfer complete.\nlast words";
        let lines: Vec<String> = udpcast_lines(&said[..]).collect();
        let want = [
            "Udp-sender 20120424",
            "Starting transfer: 00000009",
            "bytes=  1 244 880",
            "bytes=  2 531 984",
            "Transfer complete.",
            "last words",
        ];
        assert_eq!(lines, want);

        // From a pipe still open: the message is there before anything
        // else is written.
        let (read, mut write) = std::io::pipe().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in udpcast_lines(read) {
                tx.send(line).unwrap();
            }
        });
        write.write_all(b"New connection from 10.77.0.2  (#0) 00000009\nStarting transfer: 00000009\n").unwrap();
        for want in ["New connection from 10.77.0.2  (#0) 00000009", "Starting transfer: 00000009"] {
            assert_eq!(rx.recv_timeout(Duration::from_secs(20)).as_deref(), Ok(want));
        }
        drop(write);
        reader.join().unwrap();
        assert!(rx.try_recv().is_err());
    }
}
