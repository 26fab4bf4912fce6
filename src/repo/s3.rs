//! A repository in an S3-compatible object store: `s3://BUCKET/PREFIX`.
//!
//! Each file of the repository is one object, `PREFIX/NAME`. A pack is
//! uploaded in parts as it is written (a multipart upload, a few parts in
//! flight), so nothing is staged on a local disk, and becomes visible only
//! when the upload completes; every other file is one PUT. Objects are
//! never changed in place, so the snapshot file, written last, appears
//! only when every object it needs is there.
//!
//! The endpoint, region and credentials come from where S3 users keep
//! them: `AWS_ENDPOINT_URL`, `AWS_REGION` (or `AWS_DEFAULT_REGION`),
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`),
//! else the profile (`AWS_PROFILE`, else `default`) of
//! `~/.aws/credentials` and `~/.aws/config` (or the files
//! `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` name). Addressing
//! is path-style (`ENDPOINT/BUCKET/KEY`), as self-hosted stores expect.
//! A request that fails in a way that may pass (a server error, a
//! time-out, a dropped or stalled connection) is sent again with backoff
//! for up to `KLON_S3_RETRY_SECONDS` (default 120) after it first fails;
//! one that the server refuses (access denied, no such bucket) is not.
//! A request carrying a part or a window of a pack is given up (and sent
//! again) after `KLON_S3_TIMEOUT_SECONDS` (default 600), others after 60.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, MultipartId, ObjectStore, PutPayload, RetryConfig};

use super::store::{Object, ObjectWriter, Store};
use crate::error::{Error, Result};

/// Parts of a pack's upload: 8 MiB (S3 wants at least 5 MiB but the last).
const PART_SIZE: usize = 8 << 20;
/// Parts of one pack in flight at once.
const PARTS_IN_FLIGHT: usize = 4;

/// An S3 bucket (and a prefix in it) holding a repository.
pub struct S3Store {
    bucket: String,
    prefix: String,
    conn: Arc<Conn>,
}

/// A client and the runtime its requests run on (its threads do not
/// survive a fork: `klon mount` of a bucket stays in the foreground).
struct Conn {
    /// For requests that carry little.
    client: AmazonS3,
    /// For parts of uploads and reads of whole files and windows.
    bulk: AmazonS3,
    runtime: tokio::runtime::Runtime,
    /// How long a request is tried again.
    budget: Duration,
}

/// Whether a failed request may pass if sent again: the connection
/// failed, stalled or was cut, or the server answered 5xx, 408 or 429 (or
/// an error in a 200 answer, as S3 may). klon's only retries: the
/// client's own are off, as they leave out some of these (a part whose
/// body was being sent when the connection stalled).
fn transient(e: &object_store::Error) -> bool {
    if !matches!(e, object_store::Error::Generic { .. }) {
        // Not found, access denied, a failed precondition: an answer.
        return false;
    }
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<reqwest::Error>().is_some() || s.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        source = s.source();
    }
    let text = e.to_string();
    ["status code: 5", "status code: 408", "status code: 429", "error response"].iter().any(|t| text.contains(t))
}

/// Runs the request `f` makes until it succeeds, fails in a way that is
/// an answer, or `budget` has passed since it first failed (a request
/// that timed out after minutes is still tried again).
async fn retrying<T, F, Fut>(budget: Duration, mut f: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = object_store::Result<T>>,
{
    let mut failed: Option<Instant> = None;
    let mut pause = Duration::from_millis(200);
    loop {
        match f().await {
            Err(e) if transient(&e) && failed.get_or_insert_with(Instant::now).elapsed() + pause < budget => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            done => return done,
        }
    }
}

impl Conn {
    /// Runs the request `f` makes on the runtime, sent again while it
    /// fails in a way that may pass.
    fn run<T, F, Fut>(&self, f: F) -> object_store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        self.runtime.block_on(retrying(self.budget, f))
    }

    fn new(control: AmazonS3Builder, bulk: AmazonS3Builder, url: &str, budget: Duration) -> Result<Conn> {
        let client = control.build().map_err(|e| Error::Usage(format!("{url}: {e}")))?;
        let bulk = bulk.build().map_err(|e| Error::Usage(format!("{url}: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("klon-s3")
            // The sockets are written on these threads: a server that
            // goes away must give the write an error (EPIPE), not the
            // process the SIGPIPE that klon leaves fatal for `| head`.
            .on_thread_start(|| {
                use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
                let mut set = SigSet::empty();
                set.add(Signal::SIGPIPE);
                let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
            })
            .enable_all()
            .build()
            .map_err(|e| Error::Unsupported(format!("starting the S3 client: {e}")))?;
        Ok(Conn { client, bulk, runtime, budget })
    }
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store").field("bucket", &self.bucket).field("prefix", &self.prefix).finish()
    }
}

/// Splits `s3://BUCKET/PREFIX` into the bucket and the prefix (no slash at
/// either end).
pub fn parse_url(url: &str) -> std::result::Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url} is not an s3:// address"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(format!(
            "{url}: {bucket:?} is not a bucket name (3 to 63 lower-case letters, digits, dots and hyphens): write \
             s3://BUCKET/PREFIX"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|p| p.is_empty() || p == "." || p == "..") && !prefix.is_empty() {
        return Err(format!("{url}: the prefix {prefix:?} has an empty, . or .. part"));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

impl S3Store {
    /// Connects to the repository at `url` (`s3://BUCKET/PREFIX`) with the
    /// settings found in the environment and the AWS files. Nothing is
    /// sent yet.
    pub fn open(url: &str) -> Result<S3Store> {
        S3Store::open_with(url, &settings())
    }

    /// Connects to the repository at `url` with `settings` (by the names
    /// of the AWS files: aws_access_key_id, aws_secret_access_key,
    /// aws_session_token, region, endpoint_url).
    pub fn open_with(url: &str, settings: &HashMap<String, String>) -> Result<S3Store> {
        let (bucket, prefix) = parse_url(url).map_err(Error::Usage)?;
        let get = |k: &str| settings.get(k).cloned();
        let (Some(key), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) else {
            return Err(Error::Usage(format!(
                "{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile in \
                 ~/.aws/credentials)"
            )));
        };
        let retry_secs = std::env::var("KLON_S3_RETRY_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(120);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_region(get("region").unwrap_or_else(|| "us-east-1".into()))
            .with_virtual_hosted_style_request(false)
            // Requests are signed, their bodies not hashed into the
            // signature (UNSIGNED-PAYLOAD): a SHA-256 of every byte on
            // both ends costs as much CPU as the server's whole work,
            // and klon checks what it stored itself (each record's crc32
            // and blake3, read back after every backup); TLS, where the
            // endpoint uses it, guards the bytes on the way.
            .with_unsigned_payload(true)
            .with_retry(RetryConfig { max_retries: 0, retry_timeout: Duration::ZERO, ..Default::default() });
        if let Some(token) = get("aws_session_token") {
            b = b.with_token(token);
        }
        let mut http = false;
        if let Some(endpoint) = get("endpoint_url") {
            http = endpoint.starts_with("http://");
            b = b.with_endpoint(endpoint);
        }
        // A request that moves no data (a listing, a HEAD, completing an
        // upload) is given a minute; one that carries a part or a window
        // of a pack KLON_S3_TIMEOUT_SECONDS (ten minutes: 8 MiB take one
        // at 1 Mbit/s), so that a slow uplink is slow, not failing, and a
        // stalled connection is still given up and tried again.
        let bulk = std::env::var("KLON_S3_TIMEOUT_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(600);
        let with_timeout = |secs| {
            let options = ClientOptions::new()
                .with_timeout(Duration::from_secs(secs))
                .with_connect_timeout(Duration::from_secs(10))
                .with_allow_http(http);
            b.clone().with_client_options(options)
        };
        let conn = Conn::new(with_timeout(60), with_timeout(bulk.max(1)), url, Duration::from_secs(retry_secs))?;
        Ok(S3Store { bucket, prefix, conn: Arc::new(conn) })
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn fail(&self, what: &str, name: &str, e: object_store::Error) -> Error {
        let hint = match &e {
            object_store::Error::NotFound { .. } => "",
            _ if e.to_string().contains("NoSuchBucket") => ": the bucket does not exist: create it first",
            _ if e.to_string().contains("AccessDenied") || e.to_string().contains("403") => {
                ": access denied: check the key and that it may use the bucket"
            }
            _ => "",
        };
        Error::io(what, self.locate(name), None, std::io::Error::other(format!("{e}{hint}")))
    }
}

/// Settings the program was given itself (the live system's unattended
/// job, from klon.conf), used instead of the environment's and the files'.
static GIVEN: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

/// Uses `settings` (by the names of the AWS files: aws_access_key_id,
/// aws_secret_access_key, region, endpoint_url) for every store this
/// process opens, instead of the environment's and the files'; kept in
/// memory only.
pub fn set_settings(settings: HashMap<String, String>) {
    *GIVEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(settings);
}

/// The settings given ([`set_settings`]), else the environment's, else the
/// profile's files', by name: aws_access_key_id, aws_secret_access_key,
/// aws_session_token, region, endpoint_url.
fn settings() -> HashMap<String, String> {
    if let Some(given) = GIVEN.lock().unwrap_or_else(|e| e.into_inner()).clone() {
        return given;
    }
    let mut out = HashMap::new();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let credentials =
        std::env::var("AWS_SHARED_CREDENTIALS_FILE").unwrap_or_else(|_| format!("{home}/.aws/credentials"));
    let config = std::env::var("AWS_CONFIG_FILE").unwrap_or_else(|_| format!("{home}/.aws/config"));
    // In the config file a profile other than default is "[profile NAME]".
    let in_config = if profile == "default" { profile.clone() } else { format!("profile {profile}") };
    for (file, section) in [(config, in_config), (credentials, profile)] {
        let Ok(text) = std::fs::read_to_string(&file) else { continue };
        out.extend(ini_section(&text, &section));
    }
    for (var, name) in [
        ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
        ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"),
        ("AWS_SESSION_TOKEN", "aws_session_token"),
        ("AWS_DEFAULT_REGION", "region"),
        ("AWS_REGION", "region"),
        ("AWS_ENDPOINT_URL_S3", "endpoint_url"),
        ("AWS_ENDPOINT_URL", "endpoint_url"),
    ] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// The `key = value` lines of section `[name]` of an INI file.
fn ini_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = section.trim() == name;
        } else if inside && let Some((k, v)) = line.split_once('=') {
            out.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    out
}

impl Store for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn read(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let c = &self.conn;
        let key = self.key(name);
        let got = c.run(|| async {
            let r = c.bulk.get(&key).await?;
            if r.meta.size > max {
                return Ok(Err(r.meta.size));
            }
            r.bytes().await.map(Ok)
        });
        match got {
            Ok(Ok(b)) => Ok(Some(b.to_vec())),
            Ok(Err(_)) => Err(Error::Corrupt(format!("{}: larger than any klon writes", self.locate(name)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail("reading", name, e)),
        }
    }

    fn open(&self, name: &str) -> Result<Box<dyn Object>> {
        Ok(Box::new(S3Object {
            conn: self.conn.clone(),
            key: self.key(name),
            location: self.locate(name),
            ahead: Mutex::new(ReadAhead::default()),
        }))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let c = &self.conn;
        let key = self.key(name);
        let payload = PutPayload::from(bytes.to_vec());
        c.run(|| c.bulk.put(&key, payload.clone())).map_err(|e| self.fail("writing", name, e))?;
        Ok(())
    }

    fn create(&self, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let c = &self.conn;
        let key = self.key(name);
        let id = c.run(|| c.client.create_multipart(&key)).map_err(|e| self.fail("starting", name, e))?;
        Ok(Box::new(S3Writer {
            conn: c.clone(),
            key,
            id: Some(id),
            location: self.locate(name),
            buf: Vec::with_capacity(PART_SIZE),
            parts: Vec::new(),
            sent: 0,
            tasks: tokio::task::JoinSet::new(),
        }))
    }

    fn list(&self, dir: &str) -> Result<Vec<(String, u64)>> {
        let c = &self.conn;
        let prefix = self.key(dir);
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let metas: Vec<object_store::ObjectMeta> =
            c.run(|| c.client.list(Some(&prefix)).try_collect()).map_err(|e| self.fail("listing", dir, e))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| m.location.as_ref().strip_prefix(&strip).map(|n| (n.to_string(), m.size)))
            .collect())
    }

    fn children(&self, dir: &str) -> Result<Vec<String>> {
        let c = &self.conn;
        let prefix = self.key(dir);
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let found = c.run(|| c.client.list_with_delimiter(Some(&prefix))).map_err(|e| self.fail("listing", dir, e))?;
        let mut out: Vec<String> = found
            .common_prefixes
            .iter()
            .chain(found.objects.iter().map(|m| &m.location))
            .filter_map(|p| p.as_ref().strip_prefix(&strip).map(str::to_string))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        let c = &self.conn;
        let key = self.key(name);
        match c.run(|| c.client.head(&key)) {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.fail("reading", name, e)),
        }
    }

    fn remove(&self, name: &str) -> Result<()> {
        let c = &self.conn;
        let key = self.key(name);
        match c.run(|| c.client.delete(&key)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("removing", name, e)),
        }
    }

    fn sync(&self, _dir: &str) -> Result<()> {
        // A request that returned is durable.
        Ok(())
    }

    fn is_empty_for_creation(&self) -> Result<bool> {
        let c = &self.conn;
        let prefix = if self.prefix.is_empty() { None } else { Some(ObjectPath::from(self.prefix.as_str())) };
        let first = c
            .run(|| async { c.client.list(prefix.as_ref()).try_next().await })
            .map_err(|e| self.fail("listing", "", e))?;
        Ok(first.is_none())
    }

    fn prepare(&self) -> Result<()> {
        Ok(())
    }

    fn destroy(&self) -> Result<()> {
        let c = &self.conn;
        let prefix = if self.prefix.is_empty() { None } else { Some(ObjectPath::from(self.prefix.as_str())) };
        let metas: Vec<object_store::ObjectMeta> =
            c.run(|| c.client.list(prefix.as_ref()).try_collect()).map_err(|e| self.fail("listing", "", e))?;
        for m in metas {
            match c.run(|| c.client.delete(&m.location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.fail("removing", m.location.as_ref(), e)),
            }
        }
        Ok(())
    }
}

/// Bytes of one read-ahead request, and how many are in flight ahead of
/// the reads: a restore reads a pack's records in order.
const WINDOW: u64 = 16 << 20;
const AHEAD: u64 = 3;

struct S3Object {
    conn: Arc<Conn>,
    key: ObjectPath,
    location: String,
    ahead: Mutex<ReadAhead>,
}

/// Reads that go on from the one before (skipping at most a window) are
/// served from windows fetched ahead, several at once; a read elsewhere
/// (a delta's base, a mount's random access) is one ranged GET of what it
/// asks.
#[derive(Default)]
struct ReadAhead {
    /// Where the last read ended.
    last_end: Option<u64>,
    /// The object's size, once windows are fetched.
    size: Option<u64>,
    /// Windows fetched or being fetched, by number.
    windows: BTreeMap<u64, Window>,
}

enum Window {
    Fetching(tokio::task::JoinHandle<object_store::Result<bytes::Bytes>>),
    Here(bytes::Bytes),
}

impl S3Object {
    fn fail(&self, offset: u64, e: impl std::fmt::Display) -> Error {
        Error::io("reading", &self.location, Some(offset), std::io::Error::other(e.to_string()))
    }

    /// Window `w`, fetched (waiting for it if need be).
    fn window(&self, ra: &mut ReadAhead, w: u64, offset: u64) -> Result<bytes::Bytes> {
        let here = match ra.windows.remove(&w) {
            Some(Window::Here(b)) => b,
            Some(Window::Fetching(h)) => {
                self.conn.runtime.block_on(h).map_err(|e| self.fail(offset, e))?.map_err(|e| self.fail(offset, e))?
            }
            None => {
                let size = ra.size.unwrap_or(u64::MAX);
                let range = w * WINDOW..((w + 1) * WINDOW).min(size);
                self.conn
                    .run(|| self.conn.bulk.get_range(&self.key, range.clone()))
                    .map_err(|e| self.fail(offset, e))?
            }
        };
        ra.windows.insert(w, Window::Here(here.clone()));
        Ok(here)
    }
}

impl Drop for S3Object {
    fn drop(&mut self) {
        let ra = self.ahead.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, w) in std::mem::take(&mut ra.windows) {
            if let Window::Fetching(h) = w {
                h.abort();
            }
        }
    }
}

impl Object for S3Object {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut ra = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
        // Onwards from the last read, or into what is fetched already
        // (records a snapshot does not use are skipped over).
        let onwards = ra.last_end.is_some_and(|e| offset >= e && offset - e <= WINDOW)
            || ra.windows.contains_key(&(offset / WINDOW));
        ra.last_end = Some(end);
        if !onwards || buf.is_empty() {
            for (_, w) in std::mem::take(&mut ra.windows) {
                if let Window::Fetching(h) = w {
                    h.abort();
                }
            }
            let got =
                self.conn.run(|| self.conn.bulk.get_range(&self.key, offset..end)).map_err(|e| self.fail(offset, e))?;
            if got.len() != buf.len() {
                return Err(self.fail(offset, "the object is shorter than its index says"));
            }
            buf.copy_from_slice(&got);
            return Ok(());
        }
        if ra.size.is_none() {
            let meta = self.conn.run(|| self.conn.client.head(&self.key)).map_err(|e| self.fail(offset, e))?;
            ra.size = Some(meta.size);
        }
        let size = ra.size.expect("known above");
        if end > size {
            return Err(self.fail(offset, "the object is shorter than its index says"));
        }
        let (first, last) = (offset / WINDOW, (end - 1) / WINDOW);
        ra.windows.retain(|w, _| *w >= first);
        for w in first..=last + AHEAD {
            if w * WINDOW >= size || ra.windows.contains_key(&w) {
                continue;
            }
            let (client, key, budget) = (self.conn.bulk.clone(), self.key.clone(), self.conn.budget);
            let range = w * WINDOW..((w + 1) * WINDOW).min(size);
            let h = self
                .conn
                .runtime
                .spawn(async move { retrying(budget, || client.get_range(&key, range.clone())).await });
            ra.windows.insert(w, Window::Fetching(h));
        }
        for w in first..=last {
            let bytes = self.window(&mut ra, w, offset)?;
            let (from, to) = (offset.max(w * WINDOW), end.min((w + 1) * WINDOW));
            let part = &bytes[(from - w * WINDOW) as usize..(to - w * WINDOW) as usize];
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(part);
        }
        Ok(())
    }
}

/// A pack being uploaded: full parts are sent as they fill, at most
/// PARTS_IN_FLIGHT at once, each tried again on its own (same part
/// number) while it fails in a way that may pass.
struct S3Writer {
    conn: Arc<Conn>,
    key: ObjectPath,
    /// The upload, until it is completed or aborted.
    id: Option<MultipartId>,
    location: String,
    /// Bytes of the part being filled.
    buf: Vec<u8>,
    /// The parts the server has, by number.
    parts: Vec<Option<PartId>>,
    /// Parts sent (done or in flight).
    sent: usize,
    tasks: tokio::task::JoinSet<(usize, object_store::Result<PartId>)>,
}

impl S3Writer {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::io(what, &self.location, None, std::io::Error::other(e.to_string()))
    }

    /// Waits for one part in flight to be done.
    fn join_one(&mut self) -> Result<()> {
        let Some(joined) = self.conn.runtime.block_on(self.tasks.join_next()) else { return Ok(()) };
        let (n, got) = joined.map_err(|e| self.fail("uploading", e))?;
        let part = got.map_err(|e| self.fail("uploading", e))?;
        self.parts[n] = Some(part);
        Ok(())
    }

    /// Sends what is in the buffer as the next part.
    fn send_part(&mut self) -> Result<()> {
        while self.tasks.len() >= PARTS_IN_FLIGHT {
            self.join_one()?;
        }
        let n = self.sent;
        self.sent += 1;
        self.parts.push(None);
        let payload = PutPayload::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PART_SIZE)));
        let (client, key, budget) = (self.conn.bulk.clone(), self.key.clone(), self.conn.budget);
        let id = self.id.clone().expect("a writer is used until it finishes");
        self.tasks.spawn_on(
            async move { (n, retrying(budget, || client.put_part(&key, &id, n, payload.clone())).await) },
            self.conn.runtime.handle(),
        );
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        // The last part may be short (or, for an empty object, empty).
        if !self.buf.is_empty() || self.sent == 0 {
            self.send_part()?;
        }
        while !self.tasks.is_empty() {
            self.join_one()?;
        }
        let parts: Vec<PartId> = self.parts.iter().map(|p| p.clone().expect("every part is done")).collect();
        let id = self.id.clone().expect("completed once");
        let c = &self.conn;
        c.run(|| c.client.complete_multipart(&self.key, &id, parts.clone()))
            .map_err(|e| self.fail("finishing the upload of", e))?;
        self.id = None;
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn write_all(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            let take = (PART_SIZE - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == PART_SIZE {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        let done = self.complete();
        if done.is_err() {
            self.abort_upload();
        }
        done
    }

    fn abort(mut self: Box<Self>) {
        self.abort_upload();
    }
}

impl S3Writer {
    /// Stops the parts in flight and drops the upload (best effort: an
    /// upload never completed is no object; stores drop such uploads by
    /// their lifecycle rules).
    fn abort_upload(&mut self) {
        self.tasks.abort_all();
        if let Some(id) = self.id.take() {
            let c = &self.conn;
            let _ = c.runtime.block_on(c.client.abort_multipart(&self.key, &id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_profiles_are_read_as_s3_users_write_them() {
        assert_eq!(parse_url("s3://backups/host-a/").unwrap(), ("backups".into(), "host-a".into()));
        assert_eq!(parse_url("s3://backups").unwrap(), ("backups".into(), String::new()));
        for bad in ["s3://", "s3://UPPER/x", "s3://ab", "s3://b-u/x//y", "s3://bkt/../x", "/dir"] {
            assert!(parse_url(bad).is_err(), "{bad} taken");
        }
        let ini = "[default]\naws_access_key_id = A\n[other]\nAWS_Secret_Access_Key=B\n# c\n";
        assert_eq!(ini_section(ini, "default"), vec![("aws_access_key_id".to_string(), "A".to_string())]);
        assert_eq!(ini_section(ini, "other"), vec![("aws_secret_access_key".to_string(), "B".to_string())]);
    }
}
