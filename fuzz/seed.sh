#!/usr/bin/env bash
# Regenerates fuzz/seeds/<target>/ from real images made with the system's
# own tools (mkfs.*, sgdisk, sfdisk, partclone, ntfsclone, klon backup).
# Seeds are kept small (a libFuzzer input is read whole per execution):
# whole images of 1-4 MiB where the tool allows, the first 64 KiB where it
# does not (xfs and btrfs need 300 / 114 MiB).
set -euo pipefail
cd "$(dirname "$0")"
S=$PWD/seeds
T=$(mktemp -d /dev/shm/klon-seed.XXXXXX)
trap 'rm -rf "$T"' EXIT
rm -rf "$S"; mkdir -p "$S"/{manifest,chunk_index,partition_table,fs_used,partclone,ntfsclone,cz_layout,repository}

img() { rm -f "$T/$1"; truncate -s "$2" "$T/$1"; }

# Filesystems (fs_used).
img ext4 2M; mkfs.ext4 -q -F -b 1024 -N 64 "$T/ext4"; cp "$T/ext4" "$S/fs_used/ext4"
img ext2 1M; mkfs.ext2 -q -F -b 1024 -N 32 "$T/ext2"; cp "$T/ext2" "$S/fs_used/ext2"
img fat12 1M; mkfs.vfat -F 12 "$T/fat12" >/dev/null; cp "$T/fat12" "$S/fs_used/fat12"
img fat16 20M; mkfs.vfat -F 16 "$T/fat16" >/dev/null; head -c 256K "$T/fat16" > "$S/fs_used/fat16"
img exfat 2M; mkfs.exfat -b 4096 "$T/exfat" >/dev/null; cp "$T/exfat" "$S/fs_used/exfat"
img ntfs 2M; mkntfs -q -F -f "$T/ntfs" >/dev/null 2>&1 || true; cp "$T/ntfs" "$S/fs_used/ntfs"
img xfs 300M; mkfs.xfs -q -f "$T/xfs"; head -c 64K "$T/xfs" > "$S/fs_used/xfs-head"
img btrfs 120M; mkfs.btrfs -q -f "$T/btrfs" >/dev/null; head -c 128K "$T/btrfs" | tail -c 64K > /dev/null
# btrfs's superblock is at 64 KiB: keep 0..68 KiB.
head -c 69632 "$T/btrfs" > "$S/fs_used/btrfs-head"
img swap 64K; mkswap "$T/swap" >/dev/null 2>&1 && head -c 8K "$T/swap" > "$S/fs_used/swap" || true

# Partition tables: a GPT and an MBR with an extended partition (EBR chain).
img gpt 1M; sgdisk -a 8 -n 1:40:999 -n 2:1000:1900 -t 2:8300 "$T/gpt" >/dev/null; cp "$T/gpt" "$S/partition_table/gpt"
# An ext4 in partition 1 gives the klon backup below chunk records to keep.
mkfs.ext4 -q -F -E offset=$((40 * 512)) "$T/gpt" 400k 2>/dev/null
img mbr 1M
printf 'label: dos\n start=1, size=200, type=83\n start=300, size=1600, type=5\n start=301, size=500, type=83\n start=900, size=500, type=7\n' \
    | sfdisk -q "$T/mbr" >/dev/null
head -c 512K "$T/mbr" > "$S/partition_table/mbr-ebr"
sfdisk -d "$T/gpt" > "$T/gpt.sf"; sfdisk -d "$T/mbr" > "$T/mbr.sf"

# Clonezilla layout files: disk / parts / sda-pt.sf / sda-pt.parted / dev-fs.list.
for k in gpt mbr; do
    {
        printf 'sda\n\n--8<--\nsda1 sda2\n\n--8<--\n'
        sed "s#$T/$k#/dev/sda#g" "$T/$k.sf"
        printf '\n--8<--\nModel: ATA (scsi)\nDisk /dev/sda: 2048s\nSector size (logical/physical): 512B/512B\n\n--8<--\n'
        printf '# <Device name>   <File system>\n/dev/sda1 ext4\n/dev/sda2 vfat\n'
    } > "$S/cz_layout/$k"
done

# partclone and ntfsclone streams of the filesystems above.
partclone.ext4 -c -s "$T/ext4" -o "$S/partclone/ext4" -L /dev/null >/dev/null 2>&1
partclone.fat -c -s "$T/fat12" -o "$S/partclone/fat12" -L /dev/null >/dev/null 2>&1
ntfsclone --save-image -f -O "$S/ntfsclone/ntfs" "$T/ntfs" >/dev/null 2>&1 || true

# klon's own: a manifest, chunk records and an index from a real backup.
KLON=${KLON:-../target/debug/klon}
if [ -x "$KLON" ]; then
    "$KLON" backup --yes "$T/gpt" "$T/img" >/dev/null 2>&1 || "$KLON" backup "$T/gpt" "$T/img" >/dev/null 2>&1 || true
fi
if [ -f "$T/img/klon.json" ]; then
    cp "$T/img/klon.json" "$S/manifest/gpt"
    for f in "$T"/img/*.idx; do cp "$f" "$S/chunk_index/$(basename "$f")"; done
    for f in "$T"/img/*.[0-9][0-9][0-9]; do [ -f "$f" ] && head -c 4K "$f" > "$S/chunk_index/$(basename "$f").head"; done
else
    echo "seed.sh: no klon binary at $KLON (cargo build first): manifest and chunk_index seeds left empty" >&2
fi
# A repository's pack indexes (one with a delta blob), each after the
# target's mode byte 0; a patch (mode 1: three bytes of content length,
# then the patch); two contents to make a patch from (mode 2).
if [ -x "$KLON" ]; then
    head -c 16M /dev/urandom > "$T/raw"
    "$KLON" backup --quiet --repo "$T/raw" "$T/repo" >/dev/null
    dd if=/dev/urandom of="$T/raw" bs=4096 seek=100 count=3 conv=notrunc status=none
    "$KLON" backup --quiet "$T/raw" "$T/repo" >/dev/null
    n=0
    for f in "$T"/repo/packs/*/*.idx; do
        n=$((n + 1)); { printf '\x00'; head -c -32 "$f"; } > "$S/repository/index-$n"
    done
fi
python3 - "$S/repository" <<'PY'
import random, struct, sys
d = sys.argv[1]
lit = random.Random(1).randbytes(7712)
ops = struct.pack("<II", 4096, 3) + struct.pack("<III", (1 << 31) | 3, 2, 7712)
open(f"{d}/delta-1", "wb").write(bytes([1]) + (3 * 4096 + 7712).to_bytes(3, "big") + ops + lit)
a = random.Random(2).randbytes(4096)
open(f"{d}/encode-1", "wb").write(bytes([2]) + a + (a[:2048] + b"new bytes here" * 10 + a[2048:])[:4096])
PY
du -sh "$S"
