//! Repositories: snapshots of disks over time, deduplicated; each restored
//! on its own byte for byte (ext4 by its files and e2fsck); retention and
//! prune; damage of every kind of repository file caught before a write.

mod common;

use std::path::{Path, PathBuf};

use common::disks::*;
use common::repo_disk::*;

#[test]
fn snapshots_over_time_and_of_two_disks_each_restore_alone() {
    let t = TempDir::new("repo-rt");
    let d = make_disk(&t, "a.img", 1);
    let repo = t.join("repo");
    let mut states: Vec<PathBuf> = Vec::new();
    let mut added = Vec::new();
    for round in 0..3u64 {
        if round > 0 {
            // Change about 1 MiB of files and 64 KiB of the raw partition.
            put_file(&d, &t, &format!("r{round}"), &random_bytes(900 + round, 700_000));
            put_file(&d, &t, &format!("new{round}"), &text_bytes(950 + round, 200_000));
            write_at(&d.path, d.p2.0 + round * 3 * MIB, &random_bytes(990 + round, 65536));
        }
        let state = t.join(&format!("state{round}.img"));
        std::fs::copy(&d.path, &state).unwrap();
        states.push(state);
        let mut args = vec!["--json", "backup", s(&d.path), s(&repo), "--label", "laptop"];
        if round == 0 {
            args.push("--repo");
        }
        let o = klon(&args);
        ok(&o);
        let r = json(&o);
        assert_eq!(r["created_repository"], round == 0);
        added.push(r["added"]["stored_bytes"].as_u64().unwrap());
    }
    // The first snapshot holds everything; each later one only the windows
    // (4 MiB) where something changed: about 1 MB of files (written where
    // ext4 puts them, their old blocks freed elsewhere, and metadata) and
    // 64 KiB raw: a few windows of the ~20 the disk's data spans.
    assert!(added[0] > 40 * MIB, "{added:?}");
    for &a in &added[1..] {
        assert!(a < added[0] / 3, "a later snapshot added {a} bytes, the first {}: {added:?}", added[0]);
    }
    // An unchanged disk adds nothing.
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    assert_eq!(json(&o)["added"]["chunks"], 0, "{}", stdout(&o));

    // A second disk into the same repository.
    let e = make_disk(&t, "b.img", 2);
    ok(&klon(&["backup", "--quiet", s(&e.path), s(&repo), "--tag", "desktop"]));

    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 5);
    // Newest first: b, unchanged a, a round 2, 1, 0.
    let expect: Vec<(&str, &Path, &Disk)> = vec![
        (&ids[0], &e.path, &e),
        (&ids[1], &states[2], &d),
        (&ids[2], &states[2], &d),
        (&ids[3], &states[1], &d),
        (&ids[4], &states[0], &d),
    ];
    for (i, (id, original, disk)) in expect.into_iter().enumerate() {
        let out = t.join(&format!("out{i}.img"));
        let spec = format!("{}:{}", s(&repo), &id[..10]);
        ok(&klon(&["verify", "--quiet", &spec]));
        let o = klon(&["restore", "--yes", &spec, s(&out)]);
        ok(&o);
        assert!(stdout(&o).contains("read back and compared"), "{}", stdout(&o));
        assert_restored(&t, original, &out, disk, &format!("snap{i}"));
        std::fs::remove_file(&out).unwrap();
    }
    // One partition of an older snapshot onto a file of its own.
    let part = t.join("p1.img");
    ok(&klon(&[
        "restore",
        "--yes",
        "--quiet",
        "--partition",
        "1",
        &format!("{}:{}", s(&repo), &ids[3][..8]),
        s(&part),
    ]));
    run("e2fsck", &["-fn", s(&part)]);
    let (a, b) = (t.join("part.orig"), t.join("part.rest"));
    dump_files(&states[1], d.p1, &a);
    dump_files(&part, (0, d.p1.1), &b);
    run("diff", &["-r", "--no-dereference", s(&a), s(&b)]);
    // `latest` and no snapshot name the newest.
    let o = klon(&["--json", "info", &format!("{}:latest", s(&repo))]);
    ok(&o);
    assert_eq!(json(&o)["snapshot"], ids[0].as_str());
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
}

/// A window whose content changed in a few blocks is stored as those
/// blocks and a reference to the window's chunk in an earlier snapshot (a
/// delta blob); each snapshot still restores alone, byte for byte, after
/// the snapshot holding the bases is forgotten and pruned; damage to a
/// base is caught and names the snapshots that need it.
#[test]
fn changed_windows_are_stored_as_their_changed_blocks() {
    let t = TempDir::new("repo-delta");
    let d = make_disk(&t, "a.img", 5);
    let repo = t.join("repo");
    let o = klon(&["--json", "backup", "--repo", s(&d.path), s(&repo)]);
    ok(&o);
    let first = json(&o)["added"]["stored_bytes"].as_u64().unwrap();
    let first_packs = files_ending(&repo, ".pack");
    let mut states = Vec::new();
    for round in 1..=2u64 {
        // About 100 KB of files rewritten, 8 KiB of the raw partition.
        put_file(&d, &t, &format!("r{round}"), &random_bytes(500 + round, 100_000));
        write_at(&d.path, d.p2.0 + round * MIB + 4096, &random_bytes(600 + round, 8192));
        let state = t.join(&format!("state{round}.img"));
        std::fs::copy(&d.path, &state).unwrap();
        states.push(state);
        let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
        ok(&o);
        let added = &json(&o)["added"];
        let (stored, deltas) = (added["stored_bytes"].as_u64().unwrap(), added["deltas"].as_u64().unwrap());
        assert!(deltas >= 2, "round {round}: {deltas} delta blobs: {added}");
        // The changed bytes (110 KB, incompressible) and the filesystem's
        // metadata around them, not whole windows of 4 MiB.
        assert!(stored < 1_000_000, "round {round} added {stored} bytes (first backup {first}): {added}");
    }
    let ids = snapshot_ids(&repo);
    for (i, state) in states.iter().rev().enumerate() {
        let out = t.join("out.img");
        let spec = format!("{}:{}", s(&repo), &ids[i][..8]);
        ok(&klon(&["verify", "--quiet", &spec]));
        ok(&klon(&["restore", "--yes", "--quiet", &spec, s(&out)]));
        assert_restored(&t, state, &out, &d, &format!("delta{i}"));
        std::fs::remove_file(&out).unwrap();
    }

    // The bases are in the first backup's packs: damaged there, they are
    // caught, and check names the snapshots built on them.
    let damaged = t.join("damaged");
    run("cp", &["-a", s(&repo), s(&damaged)]);
    for p in &first_packs {
        let p = damaged.join(p.strip_prefix(&repo).unwrap());
        let len = std::fs::metadata(&p).unwrap().len();
        for k in 1..64 {
            flip(&p, len * k / 64);
        }
    }
    let o = klon(&["verify", &format!("{}:{}", s(&damaged), &ids[0][..8])]);
    assert_ne!(o.status.code(), Some(0), "verify of a snapshot with damaged bases passed");
    let o = klon(&["check", "--read-data", s(&damaged)]);
    fails_with(&o, 4, &[]);
    assert!(stdout(&o).contains(&format!("snapshot {}", &ids[0][..8])), "{}", stdout(&o));
    // A backup whose bases do not read back stores its changed windows
    // whole, and says so.
    let changed = t.join("changed.img");
    std::fs::copy(&d.path, &changed).unwrap();
    write_at(&changed, d.p2.0 + 3 * MIB, &random_bytes(4646, 4096));
    let o = klon(&["--json", "backup", s(&changed), s(&damaged)]);
    ok(&o);
    assert!(stderr(&o).contains("did not read back") && stderr(&o).contains("stored whole"), "{}", stderr(&o));
    assert_eq!(json(&o)["added"]["deltas"], 0, "{}", stdout(&o));

    // Forget the snapshots holding the bases whole: prune keeps the bases.
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--prune", s(&repo)]));
    assert_eq!(snapshot_ids(&repo), [ids[0].clone()]);
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &states[1], &out, &d, "after-prune");
    std::fs::remove_file(&out).unwrap();

    // Windows of 1 MiB (the smallest): the same, with a delta on top.
    let small = t.join("repo-1m");
    ok(&klon(&["backup", "--quiet", "--repo", "--window", "1M", s(&d.path), s(&small)]));
    write_at(&d.path, d.p2.0 + 5 * MIB, &random_bytes(4545, 4096));
    let o = klon(&["--json", "backup", s(&d.path), s(&small)]);
    ok(&o);
    assert!(json(&o)["added"]["deltas"].as_u64().unwrap() >= 1, "{}", stdout(&o));
    ok(&klon(&["restore", "--yes", "--quiet", s(&small), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "window-1m");
}

/// A version 1 repository is read and backed up into without delta blobs
/// (a klon that reads only version 1 can still read it); a newer version
/// is refused with advice.
#[test]
fn older_repository_versions_get_only_what_they_read_and_a_newer_one_is_refused() {
    let t = TempDir::new("repo-v1");
    let d = make_disk(&t, "a.img", 8);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let config = repo.join("klon-repository.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"format_version\": 3"), "{text}");
    std::fs::write(&config, text.replace("\"format_version\": 3", "\"format_version\": 1")).unwrap();
    write_at(&d.path, d.p2.0 + MIB, &random_bytes(4444, 8192));
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    assert_eq!(json(&o)["added"]["deltas"], 0, "{}", stdout(&o));
    for f in files_ending(&repo, ".idx") {
        assert_eq!(&std::fs::read(&f).unwrap()[24..32], &[0u8; 8], "{}: a delta count", f.display());
    }
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "v1");
    // Version 2 takes deltas, but only of whole chunks: no chains, which a
    // klon that reads version 2 would take for damage.
    std::fs::write(&config, text.replace("\"format_version\": 3", "\"format_version\": 2")).unwrap();
    for round in 1..=2 {
        write_at(&d.path, d.p2.0 + MIB + round * 65536, &random_bytes(4444 + round, 8192));
        let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
        ok(&o);
        assert_eq!(json(&o)["added"]["deltas"], 1, "{}", stdout(&o));
    }
    assert_eq!(depths(&repo).into_iter().max(), Some(1), "a chain of deltas in a version 2 repository");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "v2");
    // Version 4 is encryption: one without it is damage; 5 is newer.
    std::fs::write(&config, text.replace("\"format_version\": 3", "\"format_version\": 4")).unwrap();
    fails_with(&klon(&["snapshots", s(&repo)]), 4, &["says encrypted, but there is no encryption"]);
    std::fs::write(&config, text.replace("\"format_version\": 3", "\"format_version\": 5")).unwrap();
    let o = klon(&["snapshots", s(&repo)]);
    fails_with(&o, 1, &["repository format version 5", "use a newer klon"]);
}

/// Every chunk's base in the repository's pack indexes (None for a chunk
/// stored whole), read from the bytes docs/REPOSITORY.md lays out.
fn bases_in(repo: &Path) -> std::collections::HashMap<[u8; 32], Option<[u8; 32]>> {
    let mut all = std::collections::HashMap::new();
    for f in files_ending(repo, ".idx") {
        let b = std::fs::read(&f).unwrap();
        let n = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
        let mut bases = b[64 + 56 * n..].chunks_exact(32);
        for e in b[64..64 + 56 * n].chunks_exact(56) {
            let flags = u32::from_le_bytes(e[52..56].try_into().unwrap());
            let base = (flags & 2 != 0).then(|| bases.next().unwrap().try_into().unwrap());
            all.insert(e[..32].try_into().unwrap(), base);
        }
    }
    all
}

/// How many deltas lead from each chunk to a whole one.
fn depths(repo: &Path) -> Vec<usize> {
    let bases = bases_in(repo);
    bases
        .keys()
        .map(|id| {
            let (mut at, mut depth) = (id, 0);
            while let Some(Some(b)) = bases.get(at) {
                (at, depth) = (b, depth + 1);
                assert!(depth <= 64, "the chain of bases loops");
            }
            depth
        })
        .collect()
}

/// A window changed in backup after backup is stored as changes to its
/// previous chunk, that one as changes to the one before… (a chain, so
/// each backup adds only what changed since the last), never more than
/// 8 deltas deep: the 9th change starts again from the whole chunk. Each
/// snapshot restores byte for byte, and check reads every chain.
#[test]
fn a_window_changed_again_and_again_is_a_chain_of_deltas_at_most_8_deep() {
    let t = TempDir::new("repo-chain");
    let d = make_disk(&t, "a.img", 9);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let mut states = Vec::new();
    for round in 1..=10u64 {
        // 8 KiB of the raw partition, each time elsewhere in one window.
        write_at(&d.path, d.p2.0 + round * 64 * 1024, &random_bytes(700 + round, 8192));
        let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
        ok(&o);
        let added = &json(&o)["added"];
        assert_eq!(added["deltas"], 1, "round {round}: {added}");
        // The 8 KiB changed, not all the changes since the first backup;
        // but the 9th change, stored as changes to the whole chunk, holds
        // the 9 changes since.
        let limit = if round == 9 { 9 * 8192 + 8000 } else { 16_000 };
        assert!(added["stored_bytes"].as_u64().unwrap() < limit, "round {round}: {added}");
        let max = depths(&repo).into_iter().max().unwrap();
        assert_eq!(max, round.min(8) as usize, "round {round}: the deepest chain");
        if round % 4 == 0 || round == 9 {
            let state = t.join(&format!("state{round}.img"));
            std::fs::copy(&d.path, &state).unwrap();
            states.push((state, snapshot_ids(&repo)[0].clone()));
        }
    }
    for (state, id) in &states {
        let out = t.join("out.img");
        let spec = format!("{}:{}", s(&repo), &id[..8]);
        ok(&klon(&["verify", "--quiet", &spec]));
        ok(&klon(&["restore", "--yes", "--quiet", &spec, s(&out)]));
        assert_restored(&t, state, &out, &d, &format!("chain-{}", &id[..8]));
        std::fs::remove_file(&out).unwrap();
    }
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    // Forget all but the newest: prune keeps its whole chain.
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--prune", s(&repo)]));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "chain-pruned");

    // A flipped byte in the whole chunk a delta of the newest snapshot is
    // made from: check names that snapshot, which holds the chunk only
    // through its chain of bases, and the disk offset.
    let bases = bases_in(&repo);
    let (pack, offset, stored_len) = records_in(&repo)
        .into_iter()
        .find(|(_, id, ..)| bases[id].is_none() && bases.values().any(|b| b.as_ref() == Some(id)))
        .map(|(pack, _, offset, stored_len)| (pack, offset, stored_len))
        .expect("a whole chunk that is a delta's base");
    flip(&pack, offset + 64 + stored_len / 2);
    let o = klon(&["check", "--read-data", s(&repo)]);
    fails_with(&o, 4, &[]);
    let newest = &snapshot_ids(&repo)[0][..8];
    let out = stdout(&o);
    let root = format!("{} at offset {offset}:", pack.display());
    let line = out.lines().find(|l| l.contains(&root)).unwrap_or_else(|| panic!("no problem names {root}: {out}"));
    assert!(line.contains(&format!("it holds snapshot {newest} ")) && line.contains("disk offset"), "{out}");
}

/// A prune keeps a mostly used pack whole, its unused chunks with it; an
/// unused delta there whose chain of bases the prune broke further down
/// (its base is there, its base's base was removed) is a leftover the next
/// prune removes: check --read-data notes it and does not call it damage,
/// and the kept snapshot restores byte for byte.
#[test]
fn check_after_a_prune_notes_unused_deltas_whose_chain_was_broken() {
    let t = TempDir::new("repo-orphans");
    let d = make_disk(&t, "a.img", 11);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    // Twice: the raw partition's first window changed by 8 KiB (a delta on
    // the last one), and 40 MB of new files, so that the pack is mostly
    // what the last snapshot still uses.
    for round in 1..=2u64 {
        write_at(&d.path, d.p2.0 + round * 64 * 1024, &random_bytes(1100 + round, 8192));
        for f in 0..4 {
            put_file(&d, &t, &format!("new{round}-{f}"), &random_bytes(1200 + round * 10 + f, 10_000_000));
        }
        ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    }
    // Then that window all new (a whole chunk), and the first backup's
    // files rewritten: its pack is mostly unused and goes.
    write_at(&d.path, d.p2.0, &random_bytes(1300, (4 * MIB) as usize));
    for i in 0..60 {
        put_file(&d, &t, &format!("r{i}"), &random_bytes(1400 + i, 700_000));
    }
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--prune", s(&repo)]));
    let bases = bases_in(&repo);
    let broken =
        bases.values().flatten().filter(|b| matches!(bases.get(*b), Some(Some(bb)) if !bases.contains_key(bb)));
    assert!(broken.count() > 0, "no delta left whose base's base was pruned: the test does not test the case");
    let o = klon(&["check", "--read-data", s(&repo)]);
    ok(&o);
    assert!(stdout(&o).contains("which a prune removed; no snapshot uses it"), "{}", stdout(&o));
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "orphans");
}

/// Every record of the repository's packs: its pack file, chunk id,
/// offset and stored length, read from the pack indexes' bytes.
fn records_in(repo: &Path) -> Vec<(PathBuf, [u8; 32], u64, u64)> {
    let mut all = Vec::new();
    for f in files_ending(repo, ".idx") {
        let b = std::fs::read(&f).unwrap();
        let n = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
        for e in b[64..64 + 56 * n].chunks_exact(56) {
            let offset = u64::from_le_bytes(e[32..40].try_into().unwrap());
            let stored_len = u64::from(u32::from_le_bytes(e[40..44].try_into().unwrap()));
            all.push((f.with_extension("pack"), e[..32].try_into().unwrap(), offset, stored_len));
        }
    }
    all
}

/// `klon copy` sends only the chunks the destination lacks, each copy
/// restores alone, a second copy sends nothing, one cut short is finished
/// by the next, damage in the source stops it before any snapshot is
/// written, and a destination of format 2 gets deltas' content whole.
#[test]
fn copy_sends_only_what_the_destination_lacks_and_each_copy_restores_alone() {
    let t = TempDir::new("repo-copy");
    let d = make_disk(&t, "a.img", 12);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let change = |round: u64| {
        write_at(&d.path, d.p2.0 + round * 65536, &random_bytes(1200 + round, 8192));
        put_file(&d, &t, &format!("r{round}"), &random_bytes(1300 + round, 100_000));
    };
    change(1);
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    let state2 = t.join("state2.img");
    std::fs::copy(&d.path, &state2).unwrap();

    let copy = t.join("copy");
    let o = klon(&["--json", "copy", s(&repo), s(&copy)]);
    ok(&o);
    let r = json(&o);
    assert_eq!(r["copied"].as_array().unwrap().len(), 2, "{r}");
    assert!(r["chunks"].as_u64().unwrap() > 0 && r["verified"] == true, "{r}");
    ok(&klon(&["check", "--quiet", "--read-data", s(&copy)]));
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&copy), s(&out)]));
    assert_restored(&t, &state2, &out, &d, "copy");
    // Again: nothing to send.
    let o = klon(&["--json", "copy", s(&repo), s(&copy)]);
    ok(&o);
    let r = json(&o);
    assert_eq!((r["copied"].as_array().unwrap().len(), r["skipped"].as_array().unwrap().len()), (0, 2), "{r}");
    assert_eq!(r["chunks"], 0, "{r}");
    // A third backup: only what it added is sent.
    change(2);
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    let added = json(&o)["added"]["chunks"].as_u64().unwrap();
    let o = klon(&["--json", "copy", s(&repo), s(&copy)]);
    ok(&o);
    let r = json(&o);
    assert_eq!(r["copied"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["chunks"], added, "the copy sent more than the backup added: {r}");
    ok(&klon(&["restore", "--yes", "--quiet", s(&copy), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "copy-3");
    ok(&klon(&["check", "--quiet", "--read-data", s(&copy)]));

    // Cut short, then finished by the next copy.
    for ms in [40, 150, 400] {
        let cut = t.join(&format!("cut{ms}"));
        run_killed(&["copy", "--quiet", s(&repo), s(&cut)], ms);
        ok(&klon(&["copy", "--quiet", s(&repo), s(&cut)]));
        ok(&klon(&["check", "--quiet", "--read-data", s(&cut)]));
        assert_eq!(snapshot_ids(&cut).len(), 3, "after a copy killed at {ms} ms");
    }

    // Into format 2: deltas go whole.
    let v2 = t.join("v2");
    ok(&klon(&["copy", "--quiet", s(&repo), s(&v2), "latest"]));
    for f in files_ending(&v2.join("snapshots"), "").into_iter().chain(files_ending(&v2.join("packs"), "")) {
        std::fs::remove_file(f).unwrap();
    }
    let config = v2.join("klon-repository.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"format_version\": 3", "\"format_version\": 2")).unwrap();
    ok(&klon(&["copy", "--quiet", s(&repo), s(&v2)]));
    assert_eq!(depths(&v2).into_iter().max(), Some(0), "a delta in a copy of format 2");
    ok(&klon(&["restore", "--yes", "--quiet", s(&v2), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "copy-v2");

    // Damage in the source: refused, no snapshot, the new repository gone.
    let packs = files_ending(&repo, ".pack");
    for p in &packs {
        let len = std::fs::metadata(p).unwrap().len();
        flip(p, len / 2);
    }
    let bad = t.join("bad");
    let o = klon(&["copy", s(&repo), s(&bad)]);
    fails_with(&o, 4, &["no snapshot was copied", "removed"]);
    assert!(!bad.exists(), "the new repository was left behind");
}

/// A delta left in a pack after its base was pruned (no snapshot used
/// either) is not reused by a later backup of the same content: that
/// snapshot stores the chunk again and restores on its own.
#[test]
fn a_delta_whose_base_was_pruned_is_not_reused() {
    let t = TempDir::new("repo-orphan");
    let d = make_disk(&t, "a.img", 7);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let first_packs: Vec<PathBuf> =
        files_ending(&repo, ".pack").into_iter().chain(files_ending(&repo, ".idx")).collect();
    write_at(&d.path, d.p2.0 + MIB, &random_bytes(4343, 8192));
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    assert!(json(&o)["added"]["deltas"].as_u64().unwrap() >= 1, "{}", stdout(&o));
    // What forgetting both and a prune that removed the first backup's
    // packs (and kept the second's) leave: deltas whose base is gone.
    for f in files_ending(&repo.join("snapshots"), "") {
        std::fs::remove_file(f).unwrap();
    }
    for f in &first_packs {
        std::fs::remove_file(f).unwrap();
    }
    let o = klon(&["check", s(&repo)]);
    ok(&o);
    assert!(stdout(&o).contains("which a prune removed"), "{}", stdout(&o));
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    let out = t.join("out.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_restored(&t, &d.path, &out, &d, "orphan");
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
}

/// Rewrites snapshot `id`'s file with its `time` set to `time` (as a
/// machine with a wrong clock would have written it) under its new name,
/// which it returns.
fn set_time(repo: &Path, id: &str, time: i64) -> String {
    let old = repo.join("snapshots").join(format!("{id}.json"));
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&old).unwrap()).unwrap();
    v["time"] = time.into();
    let bytes = serde_json::to_vec_pretty(&v).unwrap();
    let new = blake3::hash(&bytes).to_hex().to_string();
    std::fs::write(repo.join("snapshots").join(format!("{new}.json")), &bytes).unwrap();
    std::fs::remove_file(&old).unwrap();
    new
}

fn snapshot_time(repo: &Path, id: &str) -> i64 {
    let f = std::fs::read(repo.join("snapshots").join(format!("{id}.json"))).unwrap();
    serde_json::from_slice::<serde_json::Value>(&f).unwrap()["time"].as_i64().unwrap()
}

/// The backup made last is the newest: `latest`, the list and
/// `forget --keep-last` agree on it even when two backups start in the
/// same second or the clock went back between them (a live stick on a
/// machine whose clock is wrong).
#[test]
fn the_backup_made_last_is_the_latest_whatever_the_clock_says() {
    let t = TempDir::new("repo-order");
    let d = make_disk(&t, "a.img", 3);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    write_at(&d.path, d.p2.0, &random_bytes(4242, 65536));
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    let ids = snapshot_ids(&repo);
    assert_eq!(ids.len(), 2);
    let first_time = snapshot_time(&repo, &ids[1]);
    // The second backup as a clock a day behind would have stamped it;
    // then both in the same second.
    let mut second = ids[0].clone();
    for time in [first_time - 86_400, first_time] {
        second = set_time(&repo, &second, time);
        assert_eq!(snapshot_ids(&repo), [second.clone(), ids[1].clone()], "the list's order (time {time})");
        let o = klon(&["--json", "info", s(&repo)]);
        ok(&o);
        assert_eq!(json(&o)["snapshot"], second.as_str(), "latest is not the backup made last (time {time})");
        let out = t.join("out.img");
        ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
        assert_same(&d.path, &out, 0, std::fs::metadata(&d.path).unwrap().len(), "restore of latest");
        std::fs::remove_file(&out).unwrap();
        let o = klon(&["--json", "forget", "--keep-last", "1", "--dry-run", s(&repo)]);
        ok(&o);
        let r = json(&o);
        let keep: Vec<&str> = r["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["keep"] == true)
            .map(|x| x["id"].as_str().unwrap())
            .collect();
        assert_eq!(keep, [second.as_str()], "forget --keep-last 1 keeps the wrong one: {}", stdout(&o));
    }
}

#[test]
fn forget_and_prune_free_room_and_keep_every_kept_snapshot_whole() {
    let t = TempDir::new("repo-prune");
    let d = make_disk(&t, "a.img", 3);
    let repo = t.join("repo");
    let mut states = Vec::new();
    for round in 0..4u64 {
        if round > 0 {
            // Replace 4 MiB of the raw partition: new chunks each time.
            write_at(&d.path, d.p2.0 + 4 * MIB, &random_bytes(500 + round, (4 * MIB) as usize));
        }
        let state = t.join(&format!("state{round}.img"));
        std::fs::copy(&d.path, &state).unwrap();
        states.push(state);
        let mut args = vec!["backup", "--quiet", s(&d.path), s(&repo)];
        if round == 0 {
            args.push("--repo");
        }
        ok(&klon(&args));
    }
    let ids = snapshot_ids(&repo);
    // No policy: refused, nothing dropped.
    let o = klon(&["forget", s(&repo)]);
    assert_ne!(o.status.code(), Some(0));
    assert_eq!(snapshot_ids(&repo).len(), 4);
    // Dry run first: says what would go, changes nothing.
    let before = dir_size(&repo);
    let o = klon(&["--json", "forget", "--keep-last", "2", "--prune", "--dry-run", s(&repo)]);
    ok(&o);
    let dry = json(&o);
    assert_eq!(snapshot_ids(&repo), ids);
    assert_eq!(dir_size(&repo), before);
    let would_free = dry["prune"]["bytes_freed"].as_u64().unwrap();
    assert!(would_free >= 4 * MIB, "{dry}");
    // For real.
    let o = klon(&["--json", "forget", "--keep-last", "2", "--prune", s(&repo)]);
    ok(&o);
    let real = json(&o);
    assert_eq!(real["prune"]["bytes_freed"], dry["prune"]["bytes_freed"], "dry run and real run differ");
    assert_eq!(snapshot_ids(&repo), ids[..2].to_vec());
    assert!(dir_size(&repo) + would_free <= before + 64 * 1024, "{} + {would_free} > {before}", dir_size(&repo));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    for (i, id) in ids[..2].iter().enumerate() {
        let out = t.join(&format!("out{i}.img"));
        ok(&klon(&["restore", "--yes", "--quiet", &format!("{}:{id}", s(&repo)), s(&out)]));
        assert_restored(&t, &states[3 - i], &out, &d, &format!("kept{i}"));
    }
    // A second prune has nothing left to do.
    let o = klon(&["--json", "prune", s(&repo)]);
    ok(&o);
    assert_eq!(json(&o)["bytes_freed"], 0, "{}", stdout(&o));

    // A saved policy is applied (with a prune) after each backup, and by
    // forget without --keep options.
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--save", s(&repo)]));
    assert_eq!(snapshot_ids(&repo).len(), 1);
    write_at(&d.path, d.p2.0, &random_bytes(600, (4 * MIB) as usize));
    let o = klon(&["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    let r = json(&o);
    assert_eq!(r["keep"]["dropped"].as_array().map(|a| a.len()), Some(1), "{r}");
    assert!(r["keep"]["prune"]["bytes_freed"].as_u64().unwrap() >= 4 * MIB, "{r}");
    let ids = snapshot_ids(&repo);
    assert_eq!(ids, vec![r["snapshot"].as_str().unwrap().to_string()]);
    let out = t.join("after-keep.img");
    ok(&klon(&["restore", "--yes", "--quiet", s(&repo), s(&out)]));
    assert_same(&d.path, &out, d.p2.0, d.p2.1, "raw partition after the saved policy ran");
    ok(&klon(&["forget", "--quiet", s(&repo)]));
    std::fs::write(repo.join("keep.json"), "{ damaged").unwrap();
    let o = klon(&["forget", s(&repo)]);
    fails_with(&o, 4, &["keep.json", "--save"]);
}

/// Prune copies the chunks it keeps out of a pack it rewrites: a damaged
/// one stops it, named, with every pack and snapshot left in place.
#[test]
fn a_damaged_chunk_that_prune_would_copy_stops_it_and_nothing_is_deleted() {
    let t = TempDir::new("repo-prune-damaged");
    let d = make_disk(&t, "a.img", 4);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let first_pack = files_ending(&repo, ".pack");
    assert_eq!(first_pack.len(), 1);
    // Most of the disk new: the first backup's pack is mostly unneeded.
    write_at(&d.path, d.p2.0, &random_bytes(800, (8 * MIB) as usize));
    for i in 0..40 {
        put_file(&d, &t, &format!("r{i}"), &random_bytes(900 + i, 700_000));
    }
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    let o = klon(&["--json", "forget", "--keep-last", "1", "--prune", "--dry-run", s(&repo)]);
    ok(&o);
    assert_eq!(json(&o)["prune"]["packs_rewritten"], 1, "{}", stdout(&o));
    // The pack's first record (the partition table: kept) damaged in its
    // stored bytes.
    flip(&first_pack[0], 64 + 2);
    let listing = |dir: &Path| {
        let mut v: Vec<(PathBuf, u64)> = files_ending(dir, "")
            .into_iter()
            .filter(|f| !f.starts_with(dir.join("locks")))
            .map(|f| (f.clone(), std::fs::metadata(&f).unwrap().len()))
            .collect();
        v.sort();
        v
    };
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", s(&repo)]));
    let before = listing(&repo);
    let o = klon(&["prune", s(&repo)]);
    fails_with(&o, 4, &["crc32", s(&first_pack[0]), "nothing was deleted", "klon check --read-data"]);
    assert_eq!(listing(&repo), before, "prune changed the repository's files");
    assert!(files_ending(&repo.join("tmp"), "").is_empty(), "prune left unfinished files");
}

fn dir_size(dir: &Path) -> u64 {
    let mut sum = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        sum += if m.is_dir() { dir_size(&e.path()) } else { m.len() };
    }
    sum
}

/// Every file of the repository of kind `ext` (".pack", ".idx", ".json", ".table", config).
fn files_ending(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_ending(&p, ext));
        } else if p.to_string_lossy().ends_with(ext) {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn damage_to_any_repository_file_is_caught_before_a_write() {
    let t = TempDir::new("repo-damage");
    let d = make_disk(&t, "a.img", 4);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let pristine = t.join("pristine");
    run("cp", &["-a", s(&repo), s(&pristine)]);
    let target = t.join("target.img");
    let pattern = random_bytes(77, (220 * MIB) as usize);

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("config", Box::new(|r: &Path| flip(&r.join("klon-repository.json"), 30)), "klon-repository.json"),
        (
            "snapshot file",
            Box::new(|r: &Path| {
                flip(
                    &files_ending(r, ".json").into_iter().find(|p| p.to_string_lossy().contains("snapshots")).unwrap(),
                    100,
                )
            }),
            "checksum (blake3, its name)",
        ),
        ("table", Box::new(|r: &Path| flip(&files_ending(r, ".table")[0], 40)), "table's checksum"),
        ("pack index", Box::new(|r: &Path| flip(&files_ending(r, ".idx")[0], 70)), "pack index's checksum"),
        ("pack truncated", Box::new(|r: &Path| truncate_by(&files_ending(r, ".pack")[0], 10)), "the pack is damaged"),
        (
            "pack missing",
            Box::new(|r: &Path| std::fs::remove_file(&files_ending(r, ".pack")[0]).unwrap()),
            "the pack is missing",
        ),
        (
            "index missing",
            Box::new(|r: &Path| std::fs::remove_file(&files_ending(r, ".idx")[0]).unwrap()),
            "missing from the repository",
        ),
    ];
    for (what, damage, needle) in cases {
        let r = t.join("damaged");
        let _ = std::fs::remove_dir_all(&r);
        run("cp", &["-a", s(&pristine), s(&r)]);
        damage(&r);
        std::fs::write(&target, &pattern).unwrap();
        let o = klon(&["restore", "--yes", s(&r), s(&target)]);
        assert_ne!(o.status.code(), Some(0), "{what}: restore succeeded");
        assert!(stderr(&o).contains(needle), "{what}: {}", stderr(&o));
        assert!(std::fs::read(&target).unwrap() == pattern, "{what}: the target was written");
        let o = klon(&["verify", s(&r)]);
        assert_ne!(o.status.code(), Some(0), "{what}: verify passed");
        let o = klon(&["check", s(&r)]);
        assert_ne!(o.status.code(), Some(0), "{what}: check passed");
    }

    // A flipped byte inside a chunk's data: check --read-data names the
    // chunk, the snapshot, the partition and the disk offset; verify fails.
    let r = t.join("damaged");
    let _ = std::fs::remove_dir_all(&r);
    run("cp", &["-a", s(&pristine), s(&r)]);
    let pack = &files_ending(&r, ".pack")[0];
    flip(pack, std::fs::metadata(pack).unwrap().len() / 2);
    ok(&klon(&["check", "--quiet", s(&r)]));
    let o = klon(&["check", "--read-data", s(&r)]);
    fails_with(&o, 4, &[]);
    let out = stdout(&o);
    assert!(
        out.contains("PROBLEM: ")
            && out.contains("chunk ")
            && out.contains("it holds snapshot ")
            && out.contains("disk offset"),
        "{out}"
    );
    assert!(out.contains("partition") || out.contains("area outside"), "{out}");
    assert_ne!(klon(&["verify", s(&r)]).status.code(), Some(0));
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    let i = (at as usize).min(b.len() - 1);
    b[i] ^= 0x5a;
    std::fs::write(path, b).unwrap();
}

fn truncate_by(path: &Path, n: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - n).unwrap();
}

#[test]
fn a_busy_repository_is_refused_with_advice_and_unlock_clears_a_foreign_lock() {
    let t = TempDir::new("repo-lock");
    let d = make_disk(&t, "a.img", 5);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    // Another machine's prune holds the repository.
    let lock = serde_json::json!({"kind": "exclusive", "job": "prune", "hostname": "elsewhere",
        "boot_id": "x", "pid": 1, "time": "2026-01-01T00:00:00Z"});
    std::fs::write(repo.join("locks/exclusive-1-abc.lock"), lock.to_string()).unwrap();
    let o = klon(&["backup", s(&d.path), s(&repo)]);
    fails_with(&o, 5, &["is in use", "prune", "elsewhere", "klon unlock"]);
    assert_eq!(snapshot_ids(&repo).len(), 1);
    ok(&klon(&["unlock", s(&repo)]));
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    assert_eq!(snapshot_ids(&repo).len(), 2);
    // A policy given with the backup: a bad one is refused before reading;
    // a good one is saved and applied.
    let o = klon(&["backup", s(&d.path), s(&repo), "--keep", "sometimes"]);
    fails_with(&o, 2, &["'sometimes'", "--keep", "RULE=N"]);
    assert_eq!(snapshot_ids(&repo).len(), 2);
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo), "--keep", "last=2"]));
    assert_eq!(snapshot_ids(&repo).len(), 2);
    assert!(std::fs::read_to_string(repo.join("keep.json")).unwrap().contains("\"last\": 2"));
    // --keep, --label and --tag are for repositories only.
    let o = klon(&["backup", s(&d.path), s(&t.join("plain")), "--keep", "last=2"]);
    fails_with(&o, 2, &["for snapshots of a repository", "--repo"]);
}

/// A snapshot being restored is held from the moment it is opened: while
/// the person reads the confirmation, a forget and prune of it is refused
/// (it went ahead, and the restore then failed half-way through the disk
/// on packs that were gone).
#[test]
fn a_snapshot_waiting_for_its_confirmation_is_not_pruned_away() {
    use common::terminal::{Terminal, command_line, exit_status};
    let t = TempDir::new("repo-held");
    let d = make_disk(&t, "a.img", 7);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let first = t.join("first.img");
    std::fs::copy(&d.path, &first).unwrap();
    write_at(&d.path, d.p2.0, &random_bytes(700, (8 * MIB) as usize));
    ok(&klon(&["backup", "--quiet", s(&d.path), s(&repo)]));
    let old = snapshot_ids(&repo).pop().unwrap();
    let target = t.join("target.img");
    blank_file(&target, std::fs::metadata(&d.path).unwrap().len());
    let out = t.join("out.txt");
    let spec = format!("{}:{old}", s(&repo));
    let cmd = command_line(&[env!("CARGO_BIN_EXE_klon"), "restore", "--quiet", &spec, s(&target)], &out);
    let term = Terminal::start("held", &cmd);
    term.wait_for("Type target.img to overwrite it");
    let o = klon(&["forget", "--keep-last", "1", "--prune", s(&repo)]);
    fails_with(&o, 5, &["is in use", "restore"]);
    assert_eq!(snapshot_ids(&repo).len(), 2);
    term.type_line("target.img");
    let (said, code) = exit_status(&term, &out);
    assert_eq!(code, 0, "{said}\n{}", term.screen());
    assert_restored(&t, &first, &target, &d, "held");
    // Once it is done, the same forget goes ahead.
    ok(&klon(&["forget", "--quiet", "--keep-last", "1", "--prune", s(&repo)]));
    assert_eq!(snapshot_ids(&repo).len(), 1);
}

/// A target inside the repository is refused, as one inside an image
/// directory is, however the snapshot is named: a restore onto one of its
/// packs would overwrite the data it reads.
#[test]
fn a_target_inside_the_repository_is_refused() {
    let t = TempDir::new("repo-inside");
    let d = make_disk(&t, "a.img", 9);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    let size = std::fs::metadata(&d.path).unwrap().len();
    let pack = files_ending(&repo.join("packs"), ".pack")[0].clone();
    let before = std::fs::read(&pack).unwrap();
    let id = snapshot_ids(&repo).pop().unwrap();
    let big = repo.join("big.img");
    blank_file(&big, size);
    for spec in [s(&repo).to_string(), format!("{}:latest", s(&repo)), format!("{}:{}", s(&repo), &id[..8])] {
        let new = repo.join("new.img");
        for (target, extra) in [(&new, &[][..]), (&big, &[][..]), (&big, &["--partition", "1"][..])] {
            let mut args = vec!["restore", "--yes", &spec, s(target)];
            args.extend_from_slice(extra);
            fails_with(&klon(&args), 5, &["inside the image directory"]);
        }
        assert!(!new.exists(), "a refused restore left {}", new.display());
    }
    assert!(std::fs::read(&big).unwrap().iter().all(|&b| b == 0), "the refused target was written");
    assert_eq!(std::fs::read(&pack).unwrap(), before);
    std::fs::remove_file(&big).unwrap();
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
}

/// A seeded generator for kill points.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Starts `klon args` and kills it (SIGKILL) after `ms` milliseconds;
/// true when it had finished by then.
fn run_killed(args: &[&str], ms: u64) -> bool {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_klon"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < until {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "{args:?} failed before it was killed");
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = child.kill();
    child.wait().unwrap();
    false
}

#[test]
fn backups_and_prunes_killed_at_random_points_lose_no_complete_snapshot() {
    let t = TempDir::new("repo-kill");
    let d = make_disk(&t, "a.img", 6);
    let repo = t.join("repo");
    ok(&klon(&["backup", "--quiet", "--repo", s(&d.path), s(&repo)]));
    // Which disk state each snapshot holds.
    let mut state_of: std::collections::HashMap<String, PathBuf> = std::collections::HashMap::new();
    let first = t.join("state0.img");
    std::fs::copy(&d.path, &first).unwrap();
    state_of.insert(snapshot_ids(&repo)[0].clone(), first);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut killed, mut finished) = (0, 0);
    // Kill points spread over how long each job takes on this machine
    // (one of each timed first, uncut), so the kills land inside the work
    // however fast the machine is.
    write_at(&d.path, d.p2.0, &random_bytes(699, (2 * MIB) as usize));
    let timed = |args: &[&str]| {
        let started = std::time::Instant::now();
        ok(&klon(args));
        (started.elapsed().as_millis() as u64 * 3 / 2).max(20)
    };
    let backup_ms = timed(&["backup", "--quiet", s(&d.path), s(&repo)]);
    let prune_ms = timed(&["forget", "--quiet", "--keep-last", "3", "--prune", s(&repo)]);
    state_of.insert(snapshot_ids(&repo)[0].clone(), {
        let state = t.join("state-timed.img");
        std::fs::copy(&d.path, &state).unwrap();
        state
    });
    for round in 1..=10u64 {
        write_at(&d.path, d.p2.0 + (round % 4) * 2 * MIB, &random_bytes(700 + round, (2 * MIB) as usize));
        put_file(&d, &t, &format!("k{round}"), &random_bytes(800 + round, 1_500_000));
        let state = t.join(&format!("state{round}.img"));
        std::fs::copy(&d.path, &state).unwrap();
        let before: std::collections::HashSet<String> = snapshot_ids(&repo).into_iter().collect();
        let ms = next(&mut seed) % backup_ms;
        if run_killed(&["backup", "--quiet", s(&d.path), s(&repo)], ms) {
            finished += 1
        } else {
            killed += 1
        }
        for id in snapshot_ids(&repo) {
            if !before.contains(&id) {
                state_of.insert(id, state.clone());
            }
        }
        // Every complete snapshot's chunks are there; what a killed job
        // left is only noted.
        ok(&klon(&["check", "--quiet", s(&repo)]));
        if round % 2 == 0 {
            let ms = next(&mut seed) % prune_ms;
            if run_killed(&["forget", "--quiet", "--keep-last", "3", "--prune", s(&repo)], ms) {
                finished += 1
            } else {
                killed += 1
            }
            ok(&klon(&["check", "--quiet", s(&repo)]));
        }
    }
    assert!(killed >= 3, "only {killed} jobs were killed ({finished} finished): the kill points miss the work");
    ok(&klon(&["prune", "--quiet", s(&repo)]));
    ok(&klon(&["check", "--quiet", "--read-data", s(&repo)]));
    assert!(files_ending(&repo.join("tmp"), "").is_empty(), "prune left unfinished files");
    for (i, id) in snapshot_ids(&repo).iter().enumerate() {
        let out = t.join(&format!("out{i}.img"));
        ok(&klon(&["restore", "--yes", "--quiet", &format!("{}:{id}", s(&repo)), s(&out)]));
        assert_restored(&t, &state_of[id], &out, &d, &format!("kill{i}"));
        std::fs::remove_file(&out).unwrap();
    }
}

/// klon with the passphrase `pass` in KLON_PASSPHRASE (none: no
/// passphrase anywhere), standard input not a terminal.
fn klon_pw(pass: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_klon"));
    c.args(args).stdin(std::process::Stdio::null());
    for v in ["KLON_PASSPHRASE", "KLON_PASSPHRASE_FILE", "KLON_NEW_PASSPHRASE"] {
        c.env_remove(v);
    }
    if let Some(p) = pass {
        c.env("KLON_PASSPHRASE", p);
    }
    c.output().expect("run klon")
}

/// Every file under `dir`.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() { out.extend(all_files(&p)) } else { out.push(p) }
    }
    out
}

/// The pack's records: (offset, stored length), walking their headers.
fn pack_records(pack: &Path) -> Vec<(usize, usize)> {
    let b = std::fs::read(pack).unwrap();
    let (mut at, mut out) = (0usize, Vec::new());
    while at + 64 <= b.len() {
        assert_eq!(&b[at..at + 8], b"KLONBLB1", "no record at {at} of {}", pack.display());
        let stored = u32::from_le_bytes(b[at + 16..at + 20].try_into().unwrap()) as usize;
        out.push((at, stored));
        at += 64 + stored;
    }
    assert_eq!(at, b.len());
    out
}

#[test]
fn an_encrypted_repository_hides_what_it_holds_and_every_snapshot_restores() {
    let t = TempDir::new("repo-encrypted");
    let d = make_disk(&t, "marker-source-name.img", 11);
    let marker: Vec<u8> = b"KLON-PLAINTEXT-MARKER-3f9a1c ".repeat(40_000);
    put_file(&d, &t, "marker.txt", &marker);
    let repo = t.join("repo");
    let pw = Some("correct horse battery staple");
    let o = klon_pw(pw, &["backup", "--encrypt", "--label", "label-in-the-clear-7d2e", s(&d.path), s(&repo)]);
    ok(&o);
    // The recovery key, shown once on standard error: 8 groups of 8 hex digits.
    let err = stderr(&o);
    let recovery = err
        .split_whitespace()
        .find(|w| w.len() == 71 && w.split('-').count() == 8)
        .unwrap_or_else(|| panic!("no recovery key shown: {err}"))
        .to_string();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.join("klon-repository.json")).unwrap()).unwrap();
    assert_eq!(config["format_version"], 4);
    assert_eq!(config["encryption"]["cipher"], "xchacha20poly1305");
    let first = t.join("first.img");
    std::fs::copy(&d.path, &first).unwrap();

    // A second backup of the changed disk stores deltas, sealed too.
    put_file(&d, &t, "t3", &text_bytes(999, 300_000));
    put_file(&d, &t, "marker2.txt", &marker[..200_000]);
    let o = klon_pw(pw, &["--json", "backup", s(&d.path), s(&repo)]);
    ok(&o);
    assert!(json(&o)["added"]["deltas"].as_u64().unwrap() > 0, "{}", stdout(&o));

    // Nothing the disk or the snapshot says is in any file in the clear:
    // no file's content, the source's name, the label.
    for f in all_files(&repo) {
        let b = std::fs::read(&f).unwrap();
        for needle in [&b"KLON-PLAINTEXT-MARKER"[..], b"marker-source-name", b"label-in-the-clear", b"lost+found"] {
            assert!(
                !b.windows(needle.len()).any(|w| w == needle),
                "{} holds {:?} in the clear",
                f.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }

    // Every snapshot restores, with the passphrase or the recovery key.
    let ids = {
        let o = klon_pw(pw, &["--json", "snapshots", s(&repo)]);
        ok(&o);
        json(&o)["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids.len(), 2);
    let target = t.join("target.img");
    let _ = std::fs::remove_file(&target);
    ok(&klon_pw(pw, &["restore", "--yes", &format!("{}:{}", s(&repo), &ids[1][..8]), s(&target)]));
    assert_restored(&t, &first, &target, &d, "oldest");
    std::fs::remove_file(&target).unwrap();
    ok(&klon_pw(Some(&recovery), &["restore", "--yes", s(&repo), s(&target)]));
    assert_restored(&t, &d.path, &target, &d, "latest");
    ok(&klon_pw(Some(&recovery.to_uppercase().replace('-', " ")), &["verify", s(&repo)]));
    ok(&klon_pw(pw, &["check", "--read-data", s(&repo)]));

    // A wrong passphrase, or none, is refused with exit 6 before anything
    // is written.
    let pattern = random_bytes(5, (220 * MIB) as usize);
    std::fs::write(&target, &pattern).unwrap();
    for (pass, needle) in [(Some("wrong"), "does not unlock"), (None, "needs a passphrase")] {
        for args in [vec!["restore", "--yes", s(&repo), s(&target)], vec!["snapshots", s(&repo)]] {
            let o = klon_pw(pass, &args);
            fails_with(&o, 6, &[needle]);
        }
    }
    assert!(std::fs::read(&target).unwrap() == pattern, "a refused restore wrote the target");
    let plain = t.join("plain");
    ok(&klon_pw(None, &["init", s(&plain)]));
    fails_with(&klon_pw(pw, &["backup", "--encrypt", s(&d.path), s(&plain)]), 2, &["not encrypted"]);

    // A changed byte in a sealed chunk is named by check and fails verify
    // and restore. (Its checksums cannot be forged to match: the pack's
    // index, which records them, is sealed; a payload changed with its
    // checksums made to match fails to authenticate: src/repo/pack.rs's
    // tests.)
    let damaged = t.join("damaged");
    run("cp", &["-a", s(&repo), s(&damaged)]);
    let pack = files_ending(&damaged, ".pack").into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap();
    let (at, stored) = pack_records(&pack).into_iter().max_by_key(|r| r.1).unwrap();
    flip(&pack, (at + 64 + stored / 2) as u64);
    let o = klon_pw(pw, &["check", "--read-data", s(&damaged)]);
    fails_with(&o, 4, &[]);
    let out = stdout(&o);
    assert!(out.contains("PROBLEM: ") && out.contains("it holds snapshot ") && out.contains("disk offset"), "{out}");
    fails_with(&klon_pw(pw, &["verify", s(&damaged)]), 4, &["checksum"]);
    fails_with(&klon_pw(pw, &["restore", "--yes", s(&damaged), s(&target)]), 4, &["checksum"]);

    // Keys: add a passphrase, change it, and the last one cannot go.
    let newpw = t.join("new-pass");
    std::fs::write(&newpw, "second passphrase\n").unwrap();
    ok(&klon_pw(pw, &["key", "add", s(&repo), "--new-passphrase-file", s(&newpw)]));
    ok(&klon_pw(Some("second passphrase"), &["snapshots", s(&repo)]));
    std::fs::write(&newpw, "third passphrase\n").unwrap();
    ok(&klon_pw(Some("second passphrase"), &["key", "passwd", s(&repo), "--new-passphrase-file", s(&newpw)]));
    fails_with(&klon_pw(Some("second passphrase"), &["snapshots", s(&repo)]), 6, &["does not unlock"]);
    let pwfile = t.join("pw");
    std::fs::write(&pwfile, "third passphrase\n").unwrap();
    ok(&klon_pw(None, &["--passphrase-file", s(&pwfile), "snapshots", s(&repo)]));
    let o = klon_pw(pw, &["--json", "key", "list", s(&repo)]);
    ok(&o);
    let slots: Vec<(String, String)> = json(&o)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["id"].as_str().unwrap().to_string(), k["kind"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(slots.iter().filter(|k| k.1 == "passphrase").count(), 2, "{slots:?}");
    let first_slot = &slots[0].0;
    ok(&klon_pw(pw, &["key", "remove", s(&repo), first_slot]));
    fails_with(&klon_pw(pw, &["snapshots", s(&repo)]), 6, &["does not unlock"]);
    let last = slots.iter().rev().find(|k| k.1 == "passphrase").unwrap().0.clone();
    fails_with(&klon_pw(Some("third passphrase"), &["key", "remove", s(&repo), &last]), 5, &["last passphrase"]);

    // A copy into a new directory has the same keys: records go as they
    // are, the copy checks and restores. Into a repository with other keys
    // (none, or its own passphrase) every chunk is read, named and sealed
    // again: the copies check and restore too.
    let pw3 = Some("third passphrase");
    let copy = t.join("copy");
    ok(&klon_pw(pw3, &["copy", s(&repo), s(&copy)]));
    ok(&klon_pw(pw3, &["check", "--read-data", s(&copy)]));
    std::fs::remove_file(&target).unwrap();
    ok(&klon_pw(pw3, &["restore", "--yes", s(&copy), s(&target)]));
    assert_restored(&t, &d.path, &target, &d, "copy");
    ok(&klon_pw(pw3, &["copy", s(&repo), s(&plain)]));
    ok(&klon_pw(None, &["check", "--read-data", s(&plain)]));
    std::fs::remove_file(&target).unwrap();
    ok(&klon_pw(None, &["restore", "--yes", s(&plain), s(&target)]));
    assert_restored(&t, &d.path, &target, &d, "plain copy");
    let other = t.join("other");
    ok(&klon_pw(Some("other passphrase"), &["init", "--encrypt", s(&other)]));
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_klon"));
    c.args(["copy", s(&repo), s(&other)]).stdin(std::process::Stdio::null()).env_remove("KLON_PASSPHRASE_FILE");
    let o =
        c.env("KLON_PASSPHRASE", "third passphrase").env("KLON_TO_PASSPHRASE", "other passphrase").output().unwrap();
    ok(&o);
    ok(&klon_pw(Some("other passphrase"), &["check", "--read-data", s(&other)]));
    let o = klon_pw(pw3, &["copy", s(&repo), s(&other)]);
    fails_with(&o, 6, &["KLON_TO_PASSPHRASE"]);

    // Forget and prune keep the newest whole.
    ok(&klon_pw(pw3, &["forget", "--keep-last", "1", "--prune", s(&repo)]));
    ok(&klon_pw(pw3, &["check", "--read-data", s(&repo)]));
    std::fs::remove_file(&target).unwrap();
    ok(&klon_pw(pw3, &["restore", "--yes", s(&repo), s(&target)]));
    assert_restored(&t, &d.path, &target, &d, "pruned");
}
