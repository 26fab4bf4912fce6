//! Encrypted repositories: keys, key slots and sealed bytes.
//!
//! An encrypted repository has one master secret of 64 random bytes: a
//! data key (XChaCha20-Poly1305, every blob payload and every index,
//! snapshot and table file sealed with it under a random nonce) and an id
//! key (a chunk's id is blake3 keyed with it, so ids do not say what a
//! chunk holds). The master secret is stored only wrapped, once per key
//! slot in the configuration: sealed with a key derived by argon2id from a
//! passphrase, or from a recovery key shown once when the repository is
//! made. docs/REPOSITORY.md ("Encryption") describes the bytes.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use super::pack::ChunkId;
use crate::error::{Error, Result};
use crate::image::format::hex;

/// The cipher every sealed thing uses.
pub const CIPHER: &str = "xchacha20poly1305";
/// The key derivation of every key slot.
pub const KDF: &str = "argon2id";
/// Nonce bytes before a sealed payload.
pub const NONCE_LEN: usize = 24;
/// Authentication tag bytes after it.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a payload.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Magic at the start of a sealed file (pack index, snapshot, table).
pub const FILE_MAGIC: &[u8; 8] = b"KLONSEA1";

/// argon2id's cost for a passphrase: 64 MiB, 3 passes, 1 lane (the
/// RFC 9106 "second recommended option" with the lanes this machine's
/// cores may not have).
pub const PASSPHRASE_COST: Cost = Cost { m_kib: 64 * 1024, t: 3, p: 1 };
/// A recovery key holds 256 random bits: guessing it is hopeless at any
/// cost, so deriving from it costs little.
pub const RECOVERY_COST: Cost = Cost { m_kib: 8 * 1024, t: 1, p: 1 };
/// The most memory a key slot may ask argon2id for (a damaged or hostile
/// configuration must not exhaust the live system's RAM).
pub const MAX_M_KIB: u32 = 1024 * 1024;

/// Where sealed bytes belong: part of what is authenticated with them, so
/// that sealed bytes of one kind (or of another pack, chunk or repository)
/// do not open as another.
#[derive(Debug, Clone, Copy)]
pub enum Sealed<'a> {
    /// A blob's payload: its id, flags and content length.
    Blob {
        /// The chunk's id.
        id: &'a ChunkId,
        /// The record's flags.
        flags: u32,
        /// The content's length.
        raw_len: u32,
    },
    /// A pack's index: the pack's name.
    Index(&'a [u8; 32]),
    /// A snapshot file.
    Snapshot,
    /// A snapshot's table.
    Table,
}

impl Sealed<'_> {
    fn aad(&self) -> Vec<u8> {
        let mut a = Vec::with_capacity(96);
        let (tag, rest): (&[u8], Vec<u8>) = match self {
            Sealed::Blob { id, flags, raw_len } => {
                let mut r = id.to_vec();
                r.extend_from_slice(&flags.to_le_bytes());
                r.extend_from_slice(&raw_len.to_le_bytes());
                (b"klon-blob", r)
            }
            Sealed::Index(name) => (b"klon-index", name.to_vec()),
            Sealed::Snapshot => (b"klon-snapshot", Vec::new()),
            Sealed::Table => (b"klon-table", Vec::new()),
        };
        a.extend_from_slice(tag);
        a.push(0);
        a.extend_from_slice(&rest);
        a
    }
}

/// argon2id's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

/// The configuration's `encryption` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Encryption {
    /// [`CIPHER`].
    pub cipher: String,
    /// [`KDF`].
    pub kdf: String,
    /// The key slots: each wraps the master secret.
    pub keys: Vec<KeySlot>,
}

/// One wrapped copy of the master secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySlot {
    /// 8 hex digits, random: what `klon key remove` names.
    pub id: String,
    /// "passphrase" or "recovery".
    pub kind: String,
    /// When it was added (RFC 3339 UTC).
    pub created: String,
    /// argon2id memory, KiB.
    pub m_kib: u32,
    /// argon2id passes.
    pub t: u32,
    /// argon2id lanes.
    pub p: u32,
    /// 16 random bytes, hex.
    pub salt: String,
    /// 24 random bytes, hex.
    pub nonce: String,
    /// The master secret sealed with the derived key: 64 + 16 bytes, hex.
    pub sealed: String,
}

/// A repository's keys once unlocked, or none (a repository that is not
/// encrypted): how its chunks are named and its bytes sealed.
#[derive(Clone, Default)]
pub struct Keys(Option<Arc<Master>>);

struct Master {
    cipher: XChaCha20Poly1305,
    id_key: [u8; 32],
    /// What compares two repositories' keys without showing them.
    fingerprint: [u8; 32],
    /// The slot that unlocked them.
    slot: String,
    /// The master secret (to wrap it under another passphrase).
    secret: [u8; 64],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Keys(none)"),
            Some(m) => write!(f, "Keys(slot {})", m.slot),
        }
    }
}

impl Keys {
    /// No encryption.
    pub fn none() -> Keys {
        Keys(None)
    }

    fn from_master(secret: &[u8; 64], slot: &str) -> Keys {
        let cipher = XChaCha20Poly1305::new_from_slice(&secret[..32]).expect("32-byte key");
        let id_key: [u8; 32] = secret[32..].try_into().expect("32 bytes");
        let fingerprint = *blake3::keyed_hash(&id_key, b"klon-key-fingerprint").as_bytes();
        Keys(Some(Arc::new(Master { cipher, id_key, fingerprint, slot: slot.into(), secret: *secret })))
    }

    /// Whether the repository is encrypted.
    pub fn encrypted(&self) -> bool {
        self.0.is_some()
    }

    /// The key slot that unlocked the keys.
    pub fn slot(&self) -> Option<&str> {
        self.0.as_ref().map(|m| m.slot.as_str())
    }

    /// Whether `other` names chunks and seals bytes as these do (the same
    /// master secret, or both none).
    pub fn same_as(&self, other: &Keys) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => a.fingerprint == b.fingerprint,
            _ => false,
        }
    }

    /// The key chunk ids are keyed with, when encrypted.
    pub fn id_key(&self) -> Option<[u8; 32]> {
        self.0.as_ref().map(|m| m.id_key)
    }

    /// A chunk's id: blake3 of its content, keyed when encrypted.
    pub fn chunk_id(&self, content: &[u8]) -> ChunkId {
        match &self.0 {
            None => *blake3::hash(content).as_bytes(),
            Some(m) => *blake3::keyed_hash(&m.id_key, content).as_bytes(),
        }
    }

    /// `plain` sealed as `what` (the nonce, the ciphertext, the tag), or
    /// as is when not encrypted.
    pub fn seal(&self, what: Sealed, plain: &[u8]) -> Vec<u8> {
        let Some(m) = &self.0 else { return plain.to_vec() };
        let nonce = random_bytes::<NONCE_LEN>();
        let ct = m
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad: &what.aad() })
            .expect("XChaCha20-Poly1305 seals any length klon stores");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// What [`Keys::seal`] sealed, or None when it does not authenticate
    /// (changed, or sealed as something else or with other keys). As is
    /// when not encrypted.
    pub fn open<'a>(&self, what: Sealed, stored: &'a [u8]) -> Option<Cow<'a, [u8]>> {
        let Some(m) = &self.0 else { return Some(Cow::Borrowed(stored)) };
        if stored.len() < SEAL_OVERHEAD {
            return None;
        }
        let (nonce, ct) = stored.split_at(NONCE_LEN);
        m.cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &what.aad() }).ok().map(Cow::Owned)
    }

    /// A whole file's bytes sealed: [`FILE_MAGIC`], then as [`Keys::seal`].
    /// As is when not encrypted.
    pub fn seal_file(&self, what: Sealed, plain: &[u8]) -> Vec<u8> {
        if !self.encrypted() {
            return plain.to_vec();
        }
        let mut out = FILE_MAGIC.to_vec();
        out.extend_from_slice(&self.seal(what, plain));
        out
    }

    /// A file [`Keys::seal_file`] wrote, opened; `where_` names it in the error.
    pub fn open_file<'a>(&self, what: Sealed, bytes: &'a [u8], where_: &str) -> Result<Cow<'a, [u8]>> {
        if !self.encrypted() {
            if bytes.starts_with(FILE_MAGIC) {
                return Err(Error::Corrupt(format!(
                    "{where_}: the file is sealed (encrypted) but the repository's configuration says it is not \
                     encrypted"
                )));
            }
            return Ok(Cow::Borrowed(bytes));
        }
        let Some(sealed) = bytes.strip_prefix(FILE_MAGIC) else {
            return Err(Error::Corrupt(format!("{where_}: not sealed, in an encrypted repository")));
        };
        self.open(what, sealed).ok_or_else(|| {
            Error::Corrupt(format!(
                "{where_}: does not authenticate with the repository's key (changed since it was written, or \
                 not of this repository)"
            ))
        })
    }
}

/// `N` random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom opens");
    std::io::Read::read_exact(&mut f, &mut b).expect("/dev/urandom reads");
    b
}

fn derive(secret: &[u8], salt: &[u8], cost: Cost) -> Result<[u8; 32]> {
    let params = argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32))
        .map_err(|e| Error::Corrupt(format!("a key slot's argon2id parameters are out of range: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    a.hash_password_into(secret, salt, &mut out)
        .map_err(|e| Error::Corrupt(format!("argon2id refused a key slot: {e}")))?;
    Ok(out)
}

fn slot_aad(slot_id: &str) -> Vec<u8> {
    format!("klon-key\0{slot_id}").into_bytes()
}

/// A new key slot wrapping `master` under `secret`.
fn new_slot(master: &[u8; 64], secret: &[u8], kind: &str) -> Result<KeySlot> {
    let cost = if kind == "recovery" { RECOVERY_COST } else { PASSPHRASE_COST };
    let salt = random_bytes::<16>();
    let nonce = random_bytes::<NONCE_LEN>();
    let id = hex(&random_bytes::<4>());
    let kek = derive(secret, &salt, cost)?;
    let cipher = XChaCha20Poly1305::new_from_slice(&kek).expect("32-byte key");
    let sealed = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: master, aad: &slot_aad(&id) })
        .expect("seals 64 bytes");
    Ok(KeySlot {
        id,
        kind: kind.into(),
        created: crate::image::manifest::now_rfc3339(),
        m_kib: cost.m_kib,
        t: cost.t,
        p: cost.p,
        salt: hex(&salt),
        nonce: hex(&nonce),
        sealed: hex(&sealed),
    })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2).map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// The master secret `slot` wraps, if `secret` opens it.
fn try_slot(slot: &KeySlot, secret: &[u8]) -> Result<Option<[u8; 64]>> {
    let bad = |why: &str| Error::Corrupt(format!("key slot {} of the repository's configuration: {why}", slot.id));
    let (Some(salt), Some(nonce), Some(sealed)) = (unhex(&slot.salt), unhex(&slot.nonce), unhex(&slot.sealed)) else {
        return Err(bad("salt, nonce or sealed key is not hex"));
    };
    if nonce.len() != NONCE_LEN || sealed.len() != 64 + TAG_LEN || salt.len() < 8 {
        return Err(bad("salt, nonce or sealed key has the wrong length"));
    }
    if slot.m_kib > MAX_M_KIB || slot.t > 64 || slot.p > 64 {
        return Err(bad("asks argon2id for more than klon gives (1 GiB, 64 passes, 64 lanes)"));
    }
    let kek = derive(secret, &salt, Cost { m_kib: slot.m_kib, t: slot.t, p: slot.p })?;
    let cipher = XChaCha20Poly1305::new_from_slice(&kek).expect("32-byte key");
    Ok(cipher
        .decrypt(XNonce::from_slice(&nonce), Payload { msg: &sealed, aad: &slot_aad(&slot.id) })
        .ok()
        .map(|m| m.try_into().expect("64 bytes sealed")))
}

/// A recovery key as people read it: 64 hex digits in groups of 8.
pub fn format_recovery(key: &[u8; 32]) -> String {
    hex(key).as_bytes().chunks(8).map(|c| std::str::from_utf8(c).expect("hex")).collect::<Vec<_>>().join("-")
}

/// The recovery key `s` names (any case, groups split by dashes or
/// spaces), if it is one.
pub fn parse_recovery(s: &str) -> Option<[u8; 32]> {
    let digits: String = s.chars().filter(|c| !matches!(c, '-' | ' ')).collect::<String>().to_ascii_lowercase();
    super::pack::decode_hex32(&digits)
}

/// A new encryption: a master secret, a passphrase slot and a recovery
/// slot. Returns the configuration's object, the keys, and the recovery
/// key to show once.
pub fn create(passphrase: &str) -> Result<(Encryption, Keys, String)> {
    let master = random_bytes::<64>();
    let recovery = random_bytes::<32>();
    let pass = new_slot(&master, passphrase.as_bytes(), "passphrase")?;
    let rec = new_slot(&master, &recovery, "recovery")?;
    let keys = Keys::from_master(&master, &pass.id);
    let enc = Encryption { cipher: CIPHER.into(), kdf: KDF.into(), keys: vec![pass, rec] };
    Ok((enc, keys, format_recovery(&recovery)))
}

/// Checks what a configuration's `encryption` says before any slot is tried.
pub fn check_config(enc: &Encryption) -> std::result::Result<(), String> {
    if enc.cipher != CIPHER || enc.kdf != KDF {
        return Err(format!(
            "encrypted with {} and {}; this klon knows {CIPHER} and {KDF}: use a newer klon",
            enc.cipher, enc.kdf
        ));
    }
    if enc.keys.is_empty() {
        return Err("encrypted, but holds no key slot: nothing can unlock it".into());
    }
    Ok(())
}

/// The keys `secret` unlocks (a passphrase, or a recovery key tried
/// against the recovery slots), or an [`Error::Key`].
pub fn unlock(enc: &Encryption, secret: &str, where_: &str) -> Result<Keys> {
    let recovery = parse_recovery(secret);
    for slot in &enc.keys {
        let opened = match (slot.kind.as_str(), &recovery) {
            ("recovery", Some(r)) => try_slot(slot, r)?,
            ("passphrase", _) => try_slot(slot, secret.as_bytes())?,
            _ => None,
        };
        if let Some(master) = opened {
            return Ok(Keys::from_master(&master, &slot.id));
        }
    }
    Err(Error::Key(format!(
        "{where_}: the passphrase (or recovery key) does not unlock this encrypted repository: give the right one \
         (KLON_PASSPHRASE, --passphrase-file, or typed when asked)"
    )))
}

/// A new passphrase slot for the master secret `keys` hold (`klon key add`).
pub fn add_passphrase(keys: &Keys, passphrase: &str) -> Result<KeySlot> {
    let m = keys.0.as_ref().ok_or_else(|| Error::Usage("the repository is not encrypted".into()))?;
    new_slot(&m.secret, passphrase.as_bytes(), "passphrase")
}

/// Keys unlocked in this process, by repository id: a command that opens
/// a repository twice derives its key once.
static UNLOCKED: Mutex<Vec<(String, Keys)>> = Mutex::new(Vec::new());

/// A passphrase given for this process (`--passphrase-file`), before the
/// environment and the terminal.
static GIVEN: Mutex<Option<String>> = Mutex::new(None);

/// Takes the passphrase from `path` (its first line) for every encrypted
/// repository this process opens or makes.
pub fn set_passphrase_file(path: &std::path::Path) -> Result<()> {
    *GIVEN.lock().expect("passphrase lock") = Some(read_passphrase_file(path)?);
    Ok(())
}

/// Takes `passphrase` for every encrypted repository this process opens
/// or makes (an unattended job's, from klon.conf).
pub fn set_passphrase(passphrase: String) {
    *GIVEN.lock().expect("passphrase lock") = Some(passphrase);
}

/// The first line of the passphrase file `path`, which must not be empty.
pub fn read_passphrase_file(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading the passphrase file", path, None, e))?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(Error::Usage(format!("{}: the passphrase file's first line is empty", path.display())));
    }
    Ok(line)
}

/// The passphrase: given with `--passphrase-file`, else `KLON_PASSPHRASE`,
/// else the file `KLON_PASSPHRASE_FILE` names, else typed on the terminal
/// (twice when `new`). `what` says what it is for.
pub fn passphrase(what: &str, new: bool) -> Result<String> {
    if let Some(p) = GIVEN.lock().expect("passphrase lock").clone() {
        return Ok(p);
    }
    if let Ok(p) = std::env::var("KLON_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(p);
    }
    if let Some(path) = std::env::var_os("KLON_PASSPHRASE_FILE") {
        set_passphrase_file(std::path::Path::new(&path))?;
        return passphrase(what, new);
    }
    if console::Term::stderr().features().is_attended() && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let mut p = dialoguer::Password::new().with_prompt(format!("Passphrase for {what}"));
        if new {
            p = p.with_confirmation("The same passphrase again", "The two do not match");
        }
        return p.interact().map_err(|e| Error::Cancelled(format!("reading the passphrase: {e}")));
    }
    Err(Error::Key(format!(
        "{what} needs a passphrase: set KLON_PASSPHRASE or KLON_PASSPHRASE_FILE, give --passphrase-file FILE, or \
         run klon on a terminal to type it"
    )))
}

/// A new passphrase for `what`: the first line of `file`, else
/// `KLON_NEW_PASSPHRASE`, else typed twice on the terminal.
pub fn new_passphrase(what: &str, file: Option<&std::path::Path>) -> Result<String> {
    if let Some(path) = file {
        return read_passphrase_file(path);
    }
    if let Ok(p) = std::env::var("KLON_NEW_PASSPHRASE")
        && !p.is_empty()
    {
        return Ok(p);
    }
    if console::Term::stderr().features().is_attended() && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return dialoguer::Password::new()
            .with_prompt(format!("New passphrase for {what}"))
            .with_confirmation("The same passphrase again", "The two do not match")
            .interact()
            .map_err(|e| Error::Cancelled(format!("reading the passphrase: {e}")));
    }
    Err(Error::Usage(format!(
        "the new passphrase for {what}: give --new-passphrase-file FILE or set KLON_NEW_PASSPHRASE, or run klon on a \
         terminal to type it"
    )))
}

/// The keys of the repository `repo_id` whose configuration says `enc`:
/// unlocked once per process, with the passphrase [`passphrase`] finds.
pub fn keys_for(repo_id: &str, enc: &Encryption, where_: &str) -> Result<Keys> {
    check_config(enc).map_err(|why| Error::Unsupported(format!("{where_}: {why}")))?;
    if let Some((_, k)) = UNLOCKED.lock().expect("keys lock").iter().find(|(id, _)| id == repo_id) {
        return Ok(k.clone());
    }
    let secret = passphrase(&format!("the encrypted repository {where_}"), false)?;
    let keys = unlock(enc, &secret, where_)?;
    remember(repo_id, &keys);
    Ok(keys)
}

/// Keeps `keys` for the rest of the process (a repository just made).
pub fn remember(repo_id: &str, keys: &Keys) {
    let mut all = UNLOCKED.lock().expect("keys lock");
    all.retain(|(id, _)| id != repo_id);
    all.push((repo_id.to_string(), keys.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_unlock_with_their_secret_only() {
        let (enc, keys, recovery) = create("one passphrase").unwrap();
        assert_eq!(enc.keys.len(), 2);
        let by_pass = unlock(&enc, "one passphrase", "r").unwrap();
        assert!(by_pass.same_as(&keys));
        assert_eq!(by_pass.slot(), Some(enc.keys[0].id.as_str()));
        let by_recovery = unlock(&enc, &recovery.to_uppercase().replace('-', " "), "r").unwrap();
        assert!(by_recovery.same_as(&keys));
        assert_eq!(by_recovery.slot(), Some(enc.keys[1].id.as_str()));
        for wrong in ["one passphras", "", &recovery[..70]] {
            let e = unlock(&enc, wrong, "r").expect_err("a wrong secret unlocked");
            assert!(matches!(e, Error::Key(_)), "{e}");
        }
        // The recovery key is not a passphrase, and another repository's
        // keys are other keys.
        let (other, other_keys, _) = create("one passphrase").unwrap();
        assert!(!other_keys.same_as(&keys));
        assert!(unlock(&other, &recovery, "r").is_err());
        // A changed slot does not open; a hostile cost is refused before
        // argon2id runs.
        let mut bad = enc.clone();
        bad.keys[0].sealed.replace_range(0..2, if &enc.keys[0].sealed[0..2] == "00" { "01" } else { "00" });
        bad.keys.truncate(1);
        assert!(matches!(unlock(&bad, "one passphrase", "r"), Err(Error::Key(_))));
        let mut greedy = enc.clone();
        greedy.keys[0].m_kib = 64 << 20;
        let e = unlock(&greedy, "one passphrase", "r").err().unwrap().to_string();
        assert!(e.contains("asks argon2id for more"), "{e}");
        // A slot added for the same master secret unlocks the same keys.
        let slot = add_passphrase(&keys, "another").unwrap();
        let more = Encryption { keys: vec![slot], ..enc.clone() };
        assert!(unlock(&more, "another", "r").unwrap().same_as(&keys));
    }

    #[test]
    fn sealed_bytes_open_only_as_what_they_were_sealed_as() {
        let (_, keys, _) = create("p").unwrap();
        let id = keys.chunk_id(b"content");
        assert_ne!(id, *blake3::hash(b"content").as_bytes(), "a chunk id must not be the plain blake3");
        let what = Sealed::Blob { id: &id, flags: 5, raw_len: 7 };
        let sealed = keys.seal(what, b"payload");
        assert_eq!(sealed.len(), 7 + SEAL_OVERHEAD);
        assert_eq!(keys.open(what, &sealed).unwrap().as_ref(), b"payload");
        assert!(keys.open(Sealed::Blob { id: &id, flags: 1, raw_len: 7 }, &sealed).is_none());
        assert!(keys.open(Sealed::Blob { id: &[0; 32], flags: 5, raw_len: 7 }, &sealed).is_none());
        assert!(keys.open(Sealed::Table, &sealed).is_none());
        for i in 0..sealed.len() {
            let mut d = sealed.clone();
            d[i] ^= 0x80;
            assert!(keys.open(what, &d).is_none(), "flip at {i} opened");
        }
        // Two seals of the same bytes differ (random nonces).
        assert_ne!(keys.seal(what, b"payload"), sealed);
        let file = keys.seal_file(Sealed::Snapshot, b"{}");
        assert!(file.starts_with(FILE_MAGIC));
        assert_eq!(keys.open_file(Sealed::Snapshot, &file, "f").unwrap().as_ref(), b"{}");
        assert!(keys.open_file(Sealed::Snapshot, b"{}", "f").is_err(), "a plain file in an encrypted repository");
        assert!(Keys::none().open_file(Sealed::Snapshot, &file, "f").is_err(), "a sealed file in a plain one");
        assert_eq!(Keys::none().open_file(Sealed::Snapshot, b"{}", "f").unwrap().as_ref(), b"{}");
    }
}
