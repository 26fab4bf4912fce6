//! LUKS1 and LUKS2 headers, as cryptsetup writes them: read, checked, and
//! unlocked with a passphrase into the volume key, with which sectors are
//! encrypted as dm-crypt does. klon needs this to write a Clonezilla image
//! of an opened LUKS volume back (Clonezilla saves the header and the
//! decrypted filesystem; the filesystem goes back encrypted).
//!
//! Only what cryptsetup has made by default since 2013 is taken: data
//! encrypted with `aes-xts-plain64` (a 256- or 512-bit key, 512- to
//! 4096-byte sectors), keyslots with PBKDF2 (sha1, sha256, sha512),
//! argon2i or argon2id and the `luks1` anti-forensic splitter; one data
//! segment, no integrity, no reencryption in progress. Anything else is
//! refused naming what it is. (Layout facts from the LUKS1 and LUKS2
//! on-disk format specifications; the code is klon's own.)

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use base64::Engine as _;
use sha1::Sha1;
use sha2::{Digest, Sha256, Sha512};

/// A LUKS header's first bytes (LUKS1, and LUKS2's primary header).
pub const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// LUKS2's secondary header's first bytes.
const MAGIC_2ND: &[u8; 6] = b"SKUL\xba\xbe";
/// Bytes of a LUKS1 header (its 8 keyslots included).
const LUKS1_LEN: usize = 592;
/// Bytes of LUKS2's binary header, before its JSON text.
const LUKS2_BIN: usize = 4096;
/// Largest LUKS2 header (binary and JSON) cryptsetup makes: 4 MiB.
const LUKS2_MAX_HDR: u64 = 4 << 20;
/// Most anti-forensic stripes taken (cryptsetup uses 4000).
const MAX_STRIPES: u64 = 1 << 16;
/// Most argon2 memory taken, KiB (cryptsetup's most is 4 GiB).
const MAX_ARGON_KIB: u32 = 4 << 20;

type Error = String;

/// The hashes LUKS names for PBKDF2 and the splitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(name: &str) -> Result<Hash, Error> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(format!("hash {other:?} is not one klon computes (sha1, sha256, sha512)")),
        }
    }

    fn len(self) -> usize {
        match self {
            Hash::Sha1 => 20,
            Hash::Sha256 => 32,
            Hash::Sha512 => 64,
        }
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize().to_vec()
        }
        match self {
            Hash::Sha1 => run::<Sha1>(parts),
            Hash::Sha256 => run::<Sha256>(parts),
            Hash::Sha512 => run::<Sha512>(parts),
        }
    }

    /// PBKDF2 (RFC 8018) with HMAC of this hash.
    fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::<Sha1>(64, password, salt, iterations, out),
            Hash::Sha256 => pbkdf2::<Sha256>(64, password, salt, iterations, out),
            Hash::Sha512 => pbkdf2::<Sha512>(128, password, salt, iterations, out),
        }
    }
}

/// HMAC's two keyed states, made once for many messages.
struct Hmac<D: Digest + Clone> {
    inner: D,
    outer: D,
}

impl<D: Digest + Clone> Hmac<D> {
    fn new(block: usize, key: &[u8]) -> Self {
        let mut k = if key.len() > block { D::digest(key).to_vec() } else { key.to_vec() };
        k.resize(block, 0);
        let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
        let (mut inner, mut outer) = (D::new(), D::new());
        inner.update(pad(0x36));
        outer.update(pad(0x5c));
        Hmac { inner, outer }
    }

    fn mac(&self, msg: &[&[u8]]) -> Vec<u8> {
        let mut i = self.inner.clone();
        for m in msg {
            i.update(m);
        }
        let mut o = self.outer.clone();
        o.update(i.finalize());
        o.finalize().to_vec()
    }
}

fn pbkdf2<D: Digest + Clone>(block: usize, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
    let prf = Hmac::<D>::new(block, password);
    for (i, piece) in out.chunks_mut(<D as Digest>::output_size()).enumerate() {
        let index = (i as u32 + 1).to_be_bytes();
        let mut u = prf.mac(&[salt, &index]);
        let mut t = u.clone();
        for _ in 1..iterations {
            u = prf.mac(&[&u]);
            t.iter_mut().zip(&u).for_each(|(a, b)| *a ^= b);
        }
        piece.copy_from_slice(&t[..piece.len()]);
    }
}

/// AES with a 128- or 256-bit key.
#[derive(Clone)]
enum Aes {
    A128(Box<aes::Aes128>),
    A256(Box<aes::Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Aes {
        match key.len() {
            16 => Aes::A128(Box::new(aes::Aes128::new(GenericArray::from_slice(key)))),
            _ => Aes::A256(Box::new(aes::Aes256::new(GenericArray::from_slice(key)))),
        }
    }

    fn encrypt(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }

    fn decrypt(&self, block: &mut [u8]) {
        let b = GenericArray::from_mut_slice(block);
        match self {
            Aes::A128(c) => c.decrypt_block(b),
            Aes::A256(c) => c.decrypt_block(b),
        }
    }
}

/// AES-XTS (IEEE 1619) with dm-crypt's `plain64` IV: each sector one data
/// unit, its tweak the little-endian number of its first 512-byte sector
/// (dm-crypt counts 512-byte sectors whatever the sector size, unless
/// told `iv_large_sectors`, which LUKS does not).
#[derive(Clone)]
pub struct Xts {
    data: Aes,
    tweak: Aes,
}

impl Xts {
    /// `key` is the two AES keys one after the other (32 or 64 bytes).
    fn new(key: &[u8]) -> Result<Xts, Error> {
        if key.len() != 32 && key.len() != 64 {
            return Err(format!("an aes-xts key of {} bits; klon takes 256 or 512", key.len() * 8));
        }
        let (a, b) = key.split_at(key.len() / 2);
        Ok(Xts { data: Aes::new(a), tweak: Aes::new(b) })
    }

    fn unit(&self, iv: u64, unit: &mut [u8], encrypt: bool) {
        let mut t = [0u8; 16];
        t[..8].copy_from_slice(&iv.to_le_bytes());
        self.tweak.encrypt(&mut t);
        for block in unit.chunks_exact_mut(16) {
            block.iter_mut().zip(&t).for_each(|(a, b)| *a ^= b);
            if encrypt {
                self.data.encrypt(block);
            } else {
                self.data.decrypt(block);
            }
            block.iter_mut().zip(&t).for_each(|(a, b)| *a ^= b);
            // t = t * alpha in GF(2^128), little-endian.
            let carry = t[15] >> 7;
            for i in (1..16).rev() {
                t[i] = (t[i] << 1) | (t[i - 1] >> 7);
            }
            t[0] = (t[0] << 1) ^ if carry == 1 { 0x87 } else { 0 };
        }
    }

    /// Encrypts (or decrypts) `buf`, whole sectors of `sector` bytes, the
    /// first of them at 512-byte sector `first` (its IV).
    fn run(&self, first: u64, sector: usize, buf: &mut [u8], encrypt: bool) {
        for (i, unit) in buf.chunks_exact_mut(sector).enumerate() {
            self.unit(first + (i * sector / 512) as u64, unit, encrypt);
        }
    }
}

/// Checks a cipher spec is `aes-xts-plain64`, the one klon encrypts with.
fn xts_spec(spec: &str, what: &str) -> Result<(), Error> {
    if spec.eq_ignore_ascii_case("aes-xts-plain64") {
        Ok(())
    } else {
        Err(format!(
            "{what} is encrypted with {spec}; klon writes LUKS volumes encrypted with aes-xts-plain64 only \
             (cryptsetup's default since version 1.6)"
        ))
    }
}

/// How a keyslot's passphrase becomes its key.
#[derive(Debug, Clone)]
enum Kdf {
    Pbkdf2 { hash: Hash, iterations: u32, salt: Vec<u8> },
    Argon2 { id: bool, time: u32, memory_kib: u32, lanes: u32, salt: Vec<u8> },
}

impl Kdf {
    fn derive(&self, passphrase: &[u8], out: &mut [u8]) -> Result<(), Error> {
        match self {
            Kdf::Pbkdf2 { hash, iterations, salt } => hash.pbkdf2(passphrase, salt, *iterations, out),
            Kdf::Argon2 { id, time, memory_kib, lanes, salt } => {
                let params = argon2::Params::new(*memory_kib, *time, *lanes, Some(out.len()))
                    .map_err(|e| format!("argon2 parameters the keyslot gives are not possible: {e}"))?;
                let alg = if *id { argon2::Algorithm::Argon2id } else { argon2::Algorithm::Argon2i };
                argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                    .hash_password_into(passphrase, salt, out)
                    .map_err(|e| format!("argon2: {e}"))?;
            }
        }
        Ok(())
    }
}

/// One keyslot: where its split key is, and how to open it.
#[derive(Debug, Clone)]
struct Keyslot {
    name: String,
    kdf: Kdf,
    /// Bytes of the key the KDF makes (to decrypt the area).
    area_key: usize,
    /// The area, from the header's start.
    offset: u64,
    stripes: u64,
    af_hash: Hash,
}

/// The check of a candidate volume key.
#[derive(Debug, Clone)]
struct KeyDigest {
    hash: Hash,
    iterations: u32,
    salt: Vec<u8>,
    digest: Vec<u8>,
}

/// A LUKS header, read and checked.
#[derive(Debug, Clone)]
pub struct Header {
    /// 1 or 2.
    pub version: u16,
    /// Its UUID, as cryptsetup prints it.
    pub uuid: String,
    /// The data's cipher, as cryptsetup names it ("aes-xts-plain64").
    pub cipher: String,
    /// Where the encrypted data starts, bytes from the header's start.
    pub data_offset: u64,
    /// Bytes of the data, when the header fixes it (else to the end).
    pub data_size: Option<u64>,
    /// The data's sector size (512 for LUKS1).
    pub sector_size: u32,
    /// Added to each sector's number for its IV (LUKS2's `iv_tweak`).
    iv_tweak: u64,
    key_bytes: usize,
    slots: Vec<Keyslot>,
    digest: KeyDigest,
}

/// A volume's key, unlocked: what encrypts its sectors.
#[derive(Clone)]
pub struct VolumeKey {
    xts: Xts,
    sector_size: u32,
    iv_tweak: u64,
}

impl VolumeKey {
    /// The key of a volume whose data is aes-xts-plain64 with `key` (32 or
    /// 64 bytes) in sectors of `sector_size` bytes (512 to 4096).
    pub fn new(key: &[u8], sector_size: u32) -> Result<VolumeKey, Error> {
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(format!("LUKS sector size {sector_size} is not possible"));
        }
        Ok(VolumeKey { xts: Xts::new(key)?, sector_size, iv_tweak: 0 })
    }

    /// The data's sector size.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// Encrypts `buf` as dm-crypt writes it at byte `at` of the volume's
    /// data (what the opened volume shows at `at`). `at` and the length
    /// are whole sectors.
    pub fn encrypt(&self, at: u64, buf: &mut [u8]) {
        let s = self.sector_size as u64;
        assert!(at.is_multiple_of(s) && (buf.len() as u64).is_multiple_of(s), "LUKS encryption of part of a sector");
        self.xts.run(at / 512 + self.iv_tweak, self.sector_size as usize, buf, true);
    }

    /// Decrypts what [`Self::encrypt`] made.
    pub fn decrypt(&self, at: u64, buf: &mut [u8]) {
        let s = self.sector_size as u64;
        assert!(at.is_multiple_of(s) && (buf.len() as u64).is_multiple_of(s), "LUKS decryption of part of a sector");
        self.xts.run(at / 512 + self.iv_tweak, self.sector_size as usize, buf, false);
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A NUL-padded text field.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Reads the LUKS header at the start of `bytes` (a header backup, or a
/// partition's first bytes: everything up to the data, or at least the
/// keyslots).
pub fn parse(bytes: &[u8]) -> Result<Header, Error> {
    if bytes.len() < LUKS1_LEN || &bytes[..6] != MAGIC {
        return Err("not a LUKS header (no LUKS magic at its start)".into());
    }
    match be16(bytes, 6) {
        1 => parse_luks1(bytes),
        2 => parse_luks2(bytes),
        v => Err(format!("LUKS version {v} is not known (klon reads LUKS1 and LUKS2)")),
    }
}

fn parse_luks1(b: &[u8]) -> Result<Header, Error> {
    let cipher = format!("{}-{}", text(&b[8..40]), text(&b[40..72]));
    xts_spec(&cipher, "the LUKS1 volume")?;
    let hash = Hash::parse(&text(&b[72..104]))?;
    let data_offset = u64::from(be32(b, 104)) * 512;
    let key_bytes = be32(b, 108) as usize;
    Xts::new(&vec![0; key_bytes])?;
    let digest = KeyDigest { hash, iterations: be32(b, 164), salt: b[132..164].to_vec(), digest: b[112..132].to_vec() };
    if digest.iterations == 0 {
        return Err("the LUKS1 header's volume key digest has 0 iterations".into());
    }
    let mut slots = Vec::new();
    for i in 0..8 {
        let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
        match be32(s, 0) {
            0x00AC_71F3 => {}
            0x0000_DEAD => continue,
            other => return Err(format!("LUKS1 keyslot {i} has state 0x{other:08x}, neither enabled nor disabled")),
        }
        let stripes = u64::from(be32(s, 44));
        let iterations = be32(s, 4);
        if stripes == 0 || stripes > MAX_STRIPES || iterations == 0 {
            return Err(format!("LUKS1 keyslot {i}: {stripes} stripes, {iterations} iterations are not possible"));
        }
        slots.push(Keyslot {
            name: i.to_string(),
            kdf: Kdf::Pbkdf2 { hash, iterations, salt: s[8..40].to_vec() },
            area_key: key_bytes,
            offset: u64::from(be32(s, 40)) * 512,
            stripes,
            af_hash: hash,
        });
    }
    let header = Header {
        version: 1,
        uuid: text(&b[168..208]),
        cipher,
        data_offset,
        data_size: None,
        sector_size: 512,
        iv_tweak: 0,
        key_bytes,
        slots,
        digest,
    };
    header.check_areas()?;
    Ok(header)
}

/// LUKS2's header (binary part and JSON) at `at`, if its magic and
/// checksum hold: its length and JSON text.
fn luks2_copy(b: &[u8], at: usize, magic: &[u8; 6]) -> Result<(u64, serde_json::Value), Error> {
    if b.len() < at + LUKS2_BIN || &b[at..at + 6] != magic || be16(b, at + 6) != 2 {
        return Err("no header there".into());
    }
    let size = be64(b, at + 8);
    if !(LUKS2_BIN as u64 + 4096..=LUKS2_MAX_HDR).contains(&size) || !size.is_multiple_of(4096) {
        return Err(format!("header size {size} is not possible"));
    }
    if be64(b, at + 256) != at as u64 {
        return Err(format!("it says it is at byte {}, not {at}", be64(b, at + 256)));
    }
    let end = at + size as usize;
    if b.len() < end {
        return Err(format!("it is {size} bytes long, more than the {} bytes there are", b.len() - at));
    }
    let alg = text(&b[at + 72..at + 104]);
    if alg != "sha256" {
        return Err(format!("checksum {alg:?} is not one klon computes (sha256)"));
    }
    let mut h = Sha256::new();
    h.update(&b[at..at + 448]);
    h.update([0u8; 64]);
    h.update(&b[at + 512..end]);
    if h.finalize()[..] != b[at + 448..at + 480] {
        return Err("its checksum does not match (the header is damaged)".into());
    }
    let json = &b[at + LUKS2_BIN..end];
    let json = &json[..json.iter().position(|&c| c == 0).unwrap_or(json.len())];
    let v = serde_json::from_slice(json).map_err(|e| format!("its JSON text does not parse: {e}"))?;
    Ok((size, v))
}

/// A JSON number, or a number in a string (LUKS2 writes 64-bit values as
/// strings).
fn num(v: &serde_json::Value, what: &str) -> Result<u64, Error> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("LUKS2 {what} is not a number: {v}"))
}

fn string<'a>(v: &'a serde_json::Value, what: &str) -> Result<&'a str, Error> {
    v.as_str().ok_or_else(|| format!("LUKS2 {what} is missing or not text"))
}

fn b64(v: &serde_json::Value, what: &str) -> Result<Vec<u8>, Error> {
    base64::engine::general_purpose::STANDARD
        .decode(string(v, what)?)
        .map_err(|e| format!("LUKS2 {what} is not base64: {e}"))
}

fn parse_luks2(b: &[u8]) -> Result<Header, Error> {
    // Both copies must hold: a restore writes them back as they are.
    let (size, json) = luks2_copy(b, 0, MAGIC).map_err(|why| format!("the primary LUKS2 header is bad: {why}"))?;
    let (size2, json2) = luks2_copy(b, size as usize, MAGIC_2ND)
        .map_err(|why| format!("the secondary LUKS2 header (at byte {size}) is bad: {why}"))?;
    if size2 != size || json2 != json || be64(b, size as usize + 16) != be64(b, 16) {
        return Err("the two LUKS2 header copies differ (an update was cut short?)".into());
    }
    let uuid = text(&b[168..208]);
    if let Some(req) = json.pointer("/config/requirements/mandatory").and_then(|v| v.as_array())
        && !req.is_empty()
    {
        let names: Vec<String> = req.iter().map(|r| r.as_str().unwrap_or("?").to_string()).collect();
        return Err(format!(
            "the LUKS2 volume has requirements klon does not meet ({}; a reencryption left unfinished?): \
             finish it with cryptsetup first",
            names.join(", ")
        ));
    }
    let segments = json.get("segments").and_then(|s| s.as_object()).ok_or("LUKS2 header has no segments")?;
    let [(_, seg)] = segments.iter().collect::<Vec<_>>()[..] else {
        return Err(format!("the LUKS2 volume has {} data segments; klon takes one", segments.len()));
    };
    if string(&seg["type"], "segment type")? != "crypt" {
        return Err(format!("the LUKS2 data segment is of type {}, not crypt", seg["type"]));
    }
    if seg.get("integrity").is_some() {
        return Err("the LUKS2 volume has integrity protection (dm-integrity); klon does not write those".into());
    }
    let cipher = string(&seg["encryption"], "segment encryption")?.to_string();
    xts_spec(&cipher, "the LUKS2 volume")?;
    let sector_size = num(&seg["sector_size"], "sector size")?;
    if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(format!("LUKS2 sector size {sector_size} is not possible"));
    }
    let data_offset = num(&seg["offset"], "segment offset")?;
    let data_size = match &seg["size"] {
        serde_json::Value::String(s) if s == "dynamic" => None,
        v => Some(num(v, "segment size")?),
    };
    let iv_tweak = match seg.get("iv_tweak") {
        Some(v) => num(v, "iv_tweak")?,
        None => 0,
    };
    if data_offset < size * 2 || !data_offset.is_multiple_of(512) {
        return Err(format!("the LUKS2 data offset {data_offset} is not possible"));
    }

    let digests = json.get("digests").and_then(|s| s.as_object()).ok_or("LUKS2 header has no digests")?;
    let [(_, dg)] = digests.iter().collect::<Vec<_>>()[..] else {
        return Err(format!("the LUKS2 header has {} key digests; klon takes one", digests.len()));
    };
    if string(&dg["type"], "digest type")? != "pbkdf2" {
        return Err(format!("LUKS2 key digest of type {}, not pbkdf2", dg["type"]));
    }
    let digest = KeyDigest {
        hash: Hash::parse(string(&dg["hash"], "digest hash")?)?,
        iterations: u32::try_from(num(&dg["iterations"], "digest iterations")?).map_err(|_| "too many iterations")?,
        salt: b64(&dg["salt"], "digest salt")?,
        digest: b64(&dg["digest"], "digest")?,
    };
    if digest.iterations == 0 || digest.digest.is_empty() {
        return Err("the LUKS2 key digest is empty".into());
    }
    let digest_slots: Vec<&str> =
        dg["keyslots"].as_array().map(|a| a.iter().filter_map(|s| s.as_str()).collect()).unwrap_or_default();

    let mut key_bytes = None;
    let mut slots = Vec::new();
    let keyslots = json.get("keyslots").and_then(|s| s.as_object()).ok_or("LUKS2 header has no keyslots")?;
    for (name, ks) in keyslots {
        if ks["type"] != "luks2" || !digest_slots.contains(&name.as_str()) {
            continue; // a reencryption slot, or one not for the volume key
        }
        let what = |w: &str| format!("keyslot {name}'s {w}");
        let area = &ks["area"];
        if string(&area["type"], &what("area type"))? != "raw" {
            return Err(format!("LUKS2 keyslot {name} has an area of type {}", area["type"]));
        }
        xts_spec(string(&area["encryption"], &what("encryption"))?, &format!("LUKS2 keyslot {name}"))?;
        let af = &ks["af"];
        if string(&af["type"], &what("splitter"))? != "luks1" {
            return Err(format!("LUKS2 keyslot {name} has splitter {}", af["type"]));
        }
        let stripes = num(&af["stripes"], &what("stripes"))?;
        if stripes == 0 || stripes > MAX_STRIPES {
            return Err(format!("LUKS2 keyslot {name} has {stripes} stripes"));
        }
        let kdf = &ks["kdf"];
        let salt = b64(&kdf["salt"], &what("salt"))?;
        let u = |v: &serde_json::Value, w: &str| -> Result<u32, Error> {
            u32::try_from(num(v, &what(w))?).map_err(|_| format!("LUKS2 {} is too large", what(w)))
        };
        let kdf = match string(&kdf["type"], &what("KDF"))? {
            "pbkdf2" => Kdf::Pbkdf2 {
                hash: Hash::parse(string(&kdf["hash"], &what("hash"))?)?,
                iterations: u(&kdf["iterations"], "iterations")?,
                salt,
            },
            t @ ("argon2i" | "argon2id") => {
                let memory_kib = u(&kdf["memory"], "memory")?;
                if memory_kib > MAX_ARGON_KIB {
                    return Err(format!("LUKS2 keyslot {name} asks for {memory_kib} KiB of argon2 memory"));
                }
                Kdf::Argon2 {
                    id: t == "argon2id",
                    time: u(&kdf["time"], "time")?,
                    memory_kib,
                    lanes: u(&kdf["cpus"], "cpus")?,
                    salt,
                }
            }
            other => return Err(format!("LUKS2 keyslot {name} uses KDF {other:?}, which klon does not know")),
        };
        let kb = num(&ks["key_size"], &what("key size"))? as usize;
        if *key_bytes.get_or_insert(kb) != kb {
            return Err("LUKS2 keyslots of different key sizes".into());
        }
        slots.push(Keyslot {
            name: name.clone(),
            kdf,
            area_key: num(&area["key_size"], &what("area key size"))? as usize,
            offset: num(&area["offset"], &what("area offset"))?,
            stripes,
            af_hash: Hash::parse(string(&af["hash"], &what("splitter hash"))?)?,
        });
    }
    let key_bytes = key_bytes.ok_or("the LUKS2 header has no keyslot that opens the volume")?;
    Xts::new(&vec![0; key_bytes])?;
    let header = Header {
        version: 2,
        uuid,
        cipher,
        data_offset,
        data_size,
        sector_size: sector_size as u32,
        iv_tweak,
        key_bytes,
        slots,
        digest,
    };
    header.check_areas()?;
    Ok(header)
}

impl Header {
    /// Bytes of a keyslot's split key, on disk (whole 512-byte sectors).
    fn area_len(&self, slot: &Keyslot) -> u64 {
        (self.key_bytes as u64 * slot.stripes).div_ceil(512) * 512
    }

    /// Every keyslot's area lies before the data.
    fn check_areas(&self) -> Result<(), Error> {
        for s in &self.slots {
            let end = s.offset.checked_add(self.area_len(s)).ok_or("keyslot area past any end")?;
            if s.offset < 512 || end > self.data_offset {
                return Err(format!(
                    "LUKS keyslot {}'s area ({} bytes at {}) is not between the header and the data (at {})",
                    s.name,
                    self.area_len(s),
                    s.offset,
                    self.data_offset
                ));
            }
            if s.area_key != 32 && s.area_key != 64 {
                return Err(format!("LUKS keyslot {} has a {}-byte area key", s.name, s.area_key));
            }
        }
        if self.slots.is_empty() {
            return Err("the LUKS header has no enabled keyslot: nothing can open it".into());
        }
        Ok(())
    }

    /// Bytes from the header's start a reader needs to unlock it: up to
    /// the end of the last keyslot area.
    pub fn keyslots_end(&self) -> u64 {
        self.slots.iter().map(|s| s.offset + self.area_len(s)).max().unwrap_or(0)
    }

    /// The volume key `passphrase` opens, trying each keyslot; `None` when
    /// it opens none. `bytes` is the header with its keyslot areas.
    pub fn unlock(&self, bytes: &[u8], passphrase: &[u8]) -> Result<Option<VolumeKey>, Error> {
        if (bytes.len() as u64) < self.keyslots_end() {
            return Err(format!(
                "the LUKS header is cut short: {} bytes, its keyslots end at byte {}",
                bytes.len(),
                self.keyslots_end()
            ));
        }
        for slot in &self.slots {
            let mut key = vec![0u8; slot.area_key];
            slot.kdf.derive(passphrase, &mut key)?;
            let at = slot.offset as usize;
            let mut split = bytes[at..at + self.area_len(slot) as usize].to_vec();
            Xts::new(&key)?.run(0, 512, &mut split, false);
            let candidate = af_merge(&split, self.key_bytes, slot.stripes as usize, slot.af_hash);
            let mut check = vec![0u8; self.digest.digest.len()];
            self.digest.hash.pbkdf2(&candidate, &self.digest.salt, self.digest.iterations, &mut check);
            if check == self.digest.digest {
                return Ok(Some(VolumeKey {
                    xts: Xts::new(&candidate)?,
                    sector_size: self.sector_size,
                    iv_tweak: self.iv_tweak,
                }));
            }
        }
        Ok(None)
    }
}

/// LUKS's anti-forensic merge: the key from its `stripes` split copies.
fn af_merge(split: &[u8], key_bytes: usize, stripes: usize, hash: Hash) -> Vec<u8> {
    let mut d = vec![0u8; key_bytes];
    for stripe in split.chunks_exact(key_bytes).take(stripes - 1) {
        d.iter_mut().zip(stripe).for_each(|(a, b)| *a ^= b);
        diffuse(&mut d, hash);
    }
    let last = &split[(stripes - 1) * key_bytes..stripes * key_bytes];
    d.iter_mut().zip(last).for_each(|(a, b)| *a ^= b);
    d
}

fn diffuse(buf: &mut [u8], hash: Hash) {
    for (i, block) in buf.chunks_mut(hash.len()).enumerate() {
        let h = hash.digest(&[&(i as u32).to_be_bytes(), block]);
        let n = block.len();
        block.copy_from_slice(&h[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn xts_matches_ieee_1619_vectors() {
        // IEEE 1619-2007, vector 1: both keys zero, data unit 0, 32 zero bytes.
        let xts = Xts::new(&[0u8; 32]).unwrap();
        let mut buf = [0u8; 32];
        xts.unit(0, &mut buf, true);
        assert_eq!(buf.to_vec(), hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"));
        // Vector 2: keys 11.. and 22.., data unit 0x3333333333, 32 bytes of 44.
        let mut key = vec![0x11u8; 16];
        key.extend([0x22u8; 16]);
        let xts = Xts::new(&key).unwrap();
        let mut buf = [0x44u8; 32];
        xts.unit(0x3333333333, &mut buf, true);
        assert_eq!(buf.to_vec(), hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"));
        xts.unit(0x3333333333, &mut buf, false);
        assert_eq!(buf, [0x44u8; 32]);
    }

    #[test]
    fn pbkdf2_matches_rfc_6070() {
        let mut out = [0u8; 20];
        Hash::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(out.to_vec(), hex("ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"));
        let mut out = [0u8; 25];
        Hash::Sha1.pbkdf2(b"passwordPASSWORDpassword", b"saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, &mut out);
        assert_eq!(out.to_vec(), hex("3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"));
        let mut out = [0u8; 32];
        Hash::Sha256.pbkdf2(b"password", b"salt", 1, &mut out);
        assert_eq!(out.to_vec(), hex("120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"));
    }

    #[test]
    fn refuses_what_is_not_a_header() {
        assert!(parse(&[0u8; 4096]).unwrap_err().contains("not a LUKS header"));
        let mut b = vec![0u8; 4096];
        b[..6].copy_from_slice(MAGIC);
        b[7] = 3;
        assert!(parse(&b).unwrap_err().contains("version 3"));
    }
}
