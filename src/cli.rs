//! The command line: every command and option, parsed one way.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// klon: back up disks into compressed, checksummed images; verify them;
/// restore them to the same or a larger disk.
#[derive(Debug, Parser)]
#[command(
    name = "klon",
    version,
    about,
    long_about = None,
    disable_help_subcommand = true,
    override_usage = "klon [OPTIONS] <COMMAND>\n       klon --config FILE (the job FILE describes: README, batch jobs)\n       \
                      klon               (no command, on a terminal: the wizard's menus)",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// No progress or chatter; errors are still printed.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Details for diagnostics on stderr: each partition's method and why,
    /// workers, the helper programs' command lines; -vv also their output.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print the report as JSON on stdout; a failure prints {"ok": false, "problem": …, "exit_code": N}.
    #[arg(long, global = true)]
    pub json: bool,
    /// The passphrase of encrypted repositories, and of the LUKS volumes in
    /// a Clonezilla image: the first line of FILE (else KLON_PASSPHRASE,
    /// KLON_PASSPHRASE_FILE, or typed when asked).
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What `klon --help` ends with.
const EXAMPLES: &str = "\
Examples:
  klon                                   the wizard: back up, restore, clone from menus
  klon disks                             the disks, their partitions and filesystems
  klon backup /dev/sda /mnt/usb/laptop   an image of /dev/sda (used blocks only)
  klon verify /mnt/usb/laptop            every checksum, no disk touched
  klon restore /mnt/usb/laptop /dev/sdb  onto /dev/sdb (asks first; --yes in scripts)
  klon backup --repo /dev/sda /mnt/usb/repo   a snapshot in a repository (only what changed)
  klon demo                              all of it on a built-in sample disk
  klon --config weekly.conf              the job the file describes (job = backup, …)

klon help COMMAND shows a command's options. Exit codes: 0 done, 1 unsupported,
2 usage, 3 I/O, 4 damaged image or read-back differs, 5 refused or cancelled,
6 wrong passphrase (the README has the table).";

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List whole disks with their partitions and filesystems.
    Disks,
    /// Back up a disk (block device or disk image file) into a new image
    /// directory, or as a new snapshot of a repository.
    Backup(BackupArgs),
    /// List a repository's snapshots, newest first, and how it grows.
    Snapshots(SnapshotsArgs),
    /// Drop a repository's snapshots a retention policy does not keep.
    Forget(ForgetArgs),
    /// Free the room of chunks no snapshot of a repository references.
    Prune(PruneArgs),
    /// Check a repository: structure and references, with --read-data every byte.
    Check(CheckArgs),
    /// Make a new, empty repository (--encrypt: encrypted).
    Init(InitArgs),
    /// List, add, remove or change the passphrases of an encrypted repository.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Remove a repository's locks (after a crash left one another machine holds).
    Unlock(UnlockArgs),
    /// Copy snapshots into another repository (a second drive), sending only
    /// the chunks it lacks.
    Copy(CopyArgs),
    /// Check every checksum of an image without touching any disk.
    Verify(VerifyArgs),
    /// Restore an image onto a disk or a file (destroys what the target holds).
    Restore(RestoreArgs),
    /// Copy a disk onto another disk (or file) directly, no image in between
    /// (destroys what the target holds).
    Clone(CloneArgs),
    /// Send an image to many machines at once by multicast (udpcast); each
    /// runs klon receive and restores it onto its disk.
    Deploy(DeployArgs),
    /// Receive an image klon deploy sends by multicast and restore it onto
    /// TARGET (destroys what it holds), then report to the sender.
    Receive(ReceiveArgs),
    /// Boot klon's live system on the machines of a network (PXE: dnsmasq
    /// for DHCP and TFTP, HTTP for the kernel and initramfs), each with the
    /// same kernel command line (e.g. an unattended receive job).
    Serve(ServeArgs),
    /// Describe an image: source disk, table, partitions, sizes, completeness.
    Info(InfoArgs),
    /// Show an image read-only as files through FUSE: disk.img and pN.img
    /// per partition (klon umount DIR unmounts it).
    Mount(MountArgs),
    /// Unmount what klon mount mounted on a directory.
    Umount(UmountArgs),
    /// Turn a Clonezilla image directory into a new klon image (checking
    /// every checksum of the Clonezilla image on the way).
    Convert(ConvertArgs),
    /// Run klon's main job on a built-in sample disk: back up, verify,
    /// restore to a larger disk, compare.
    Demo(DemoArgs),
    /// Print the completions of klon's commands and options for SHELL
    /// (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(CompletionsArgs),
    /// Write klon's man pages (klon.1 and one per command) into DIR, or
    /// print klon.1 on stdout.
    Man(ManArgs),
    /// Print this message or the help of the given command.
    // klon's own rather than clap's, which took `klon help --help` for a
    // command named --help (exit 2).
    Help(HelpArgs),
    /// The live USB system's internal commands (console sessions, jobs).
    #[command(hide = true)]
    Live(LiveArgs),
}

/// `klon help`.
#[derive(Debug, Args)]
pub struct HelpArgs {
    /// The command (and its subcommands) to describe.
    pub command: Vec<String>,
}

/// `klon completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `klon man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write klon.1 and klon-COMMAND.1 into (e.g.
    /// /usr/local/share/man/man1); without it, klon.1 goes to stdout.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// `klon backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Disk to back up: a block device (/dev/sda) or a file holding a disk image.
    pub source: PathBuf,
    /// Image directory to create (it must not exist yet), or a repository
    /// to add a snapshot to.
    pub image: PathBuf,
    /// Make IMAGE a repository if it is not one yet (it must not exist, or
    /// be empty): backups over time then store only what changed.
    #[arg(long)]
    pub repo: bool,
    /// Make the new repository encrypted (implies --repo): a passphrase from
    /// --passphrase-file, KLON_PASSPHRASE, KLON_PASSPHRASE_FILE or typed twice;
    /// a recovery key is shown once.
    #[arg(long)]
    pub encrypt: bool,
    /// Save this retention policy in the repository (e.g. daily=7,weekly=4;
    /// rules last, hourly, daily, weekly, monthly, yearly) and apply it
    /// after this and every later backup (repositories only).
    #[arg(long, value_name = "RULES", value_parser = parse_keep)]
    pub keep: Option<String>,
    /// A label for the snapshot (repositories only).
    #[arg(long)]
    pub label: Option<String>,
    /// A tag for the snapshot; may be given more than once (repositories only).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Bytes of the disk one chunk of a new repository covers (1M to 8M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub window: u64,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = crate::engine::backup::DEFAULT_LEVEL)]
    pub level: i32,
    /// Largest image file, e.g. 4000M, 2G, 700M (default 4000 MiB, fits FAT32).
    #[arg(long, value_parser = parse_size, default_value = "4000M")]
    pub split: u64,
    /// Skip reading the finished image back to check it.
    #[arg(long)]
    pub no_verify: bool,
    /// Go on past sectors that cannot be read (a failing disk): read around
    /// them, store them as zeros and list them in the image.
    #[arg(long)]
    pub rescue: bool,
    /// How the source is read.
    #[command(flatten)]
    pub read: ReadArgs,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// How a source disk is read (backup, clone).
#[derive(Debug, Args, Default)]
pub struct ReadArgs {
    /// Go on even if partitions of the source are mounted read-write (the
    /// copy may then be inconsistent).
    #[arg(long)]
    pub allow_mounted: bool,
    /// Copy every partition raw (every non-zero block) instead of only the
    /// blocks its filesystem uses.
    #[arg(long)]
    pub raw: bool,
    /// Copy filesystems that were not cleanly unmounted raw instead of
    /// refusing them (their allocation maps may be wrong).
    #[arg(long)]
    pub raw_unclean: bool,
}

/// How a target disk is written (restore, clone).
#[derive(Debug, Args, Default)]
pub struct WriteArgs {
    /// Do not ask: needed when standard input is not a terminal.
    #[arg(long)]
    pub yes: bool,
    /// Extend the last partition to the end of a larger target, and grow its filesystem (ext2/3/4, NTFS, XFS,
    /// btrfs) with it.
    #[arg(long)]
    pub grow_last: bool,
    /// Skip reading everything back after writing.
    #[arg(long)]
    pub no_verify_after: bool,
}

/// `klon snapshots`.
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// The repository.
    pub repo: PathBuf,
}

/// `klon forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The repository.
    pub repo: PathBuf,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the N latest hours that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the N latest days that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the N latest ISO weeks that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the N latest months that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the N latest years that have one.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Say what would be dropped (and with --prune, freed), change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Prune afterwards: free the room of chunks no kept snapshot references.
    #[arg(long)]
    pub prune: bool,
    /// Save the policy in the repository: applied (with a prune) after each
    /// backup into it, and by `klon forget REPO` without --keep options.
    #[arg(long)]
    pub save: bool,
}

/// `klon prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The repository.
    pub repo: PathBuf,
    /// Say what would be freed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `klon check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The repository.
    pub repo: PathBuf,
    /// Read and check every byte of every pack too.
    #[arg(long)]
    pub read_data: bool,
}

/// `klon copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The repository to copy from.
    pub from: PathBuf,
    /// The repository to copy into (created, with the same window, when it
    /// does not exist or is empty).
    pub to: PathBuf,
    /// Snapshots to copy: ids, unique prefixes or `latest` (default: all).
    pub snapshots: Vec<String>,
    /// zstd level for chunks stored again (deltas into a repository of
    /// format 1 or 2; every chunk into one with other keys).
    #[arg(long, default_value_t = crate::engine::backup::DEFAULT_LEVEL)]
    pub level: i32,
    /// The destination's passphrase, when it is not the source's: the
    /// first line of FILE (else KLON_TO_PASSPHRASE, else the source's).
    #[arg(long, value_name = "FILE")]
    pub to_passphrase_file: Option<std::path::PathBuf>,
    /// Skip reading back the packs written.
    #[arg(long)]
    pub no_verify: bool,
}

/// `klon init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The directory to make a repository (it must not exist, or be empty).
    pub repo: PathBuf,
    /// Encrypt it: a passphrase (from --passphrase-file, KLON_PASSPHRASE,
    /// KLON_PASSPHRASE_FILE, or typed twice); a recovery key is shown once.
    #[arg(long)]
    pub encrypt: bool,
    /// Bytes of the disk one chunk covers (1M to 8M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub window: u64,
}

/// `klon key`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// The key slots of an encrypted repository.
    List(KeyRepoArgs),
    /// Add a passphrase (the new one from --new-passphrase-file,
    /// KLON_NEW_PASSPHRASE, or typed twice).
    Add(KeyNewArgs),
    /// Change the passphrase that unlocked the repository.
    Passwd(KeyNewArgs),
    /// Remove a key slot (not the last one).
    Remove(KeyRemoveArgs),
}

/// `klon key list`.
#[derive(Debug, Args)]
pub struct KeyRepoArgs {
    /// The repository.
    pub repo: PathBuf,
}

/// `klon key add`, `klon key passwd`.
#[derive(Debug, Args)]
pub struct KeyNewArgs {
    /// The repository.
    pub repo: PathBuf,
    /// The new passphrase: the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub new_passphrase_file: Option<PathBuf>,
}

/// `klon key remove`.
#[derive(Debug, Args)]
pub struct KeyRemoveArgs {
    /// The repository.
    pub repo: PathBuf,
    /// The key slot's id (klon key list shows them).
    pub slot: String,
}

/// `klon unlock`.
#[derive(Debug, Args)]
pub struct UnlockArgs {
    /// The repository.
    pub repo: PathBuf,
}

/// `klon verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Image directory (klon's, or a Clonezilla image directory), or
    /// REPO[:SNAPSHOT] (default: the latest snapshot).
    pub image: PathBuf,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `klon restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image directory (klon's, or a Clonezilla image directory), or
    /// REPO[:SNAPSHOT] (default: the latest snapshot).
    pub image: PathBuf,
    /// Target: a block device, or a file (created with the source disk's size when missing).
    pub target: PathBuf,
    /// Restore only partition N of the image: TARGET is then the partition's
    /// new place (a partition, a logical volume, or a file at least as large),
    /// and nothing else is written.
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// With --partition: TARGET is a disk whose partition table is kept, and
    /// its partition M receives the data.
    #[arg(long, value_name = "M", requires = "partition")]
    pub to: Option<u32>,
    /// Restore only logical volume VG/LV of an LVM2 host's image (a linear
    /// volume, a thin volume or snapshot: a virtual machine's disk) onto
    /// TARGET, a disk or a file (created with the volume's size).
    #[arg(long, value_name = "VG/LV", conflicts_with_all = ["partition", "grow_last", "grow_all"])]
    pub volume: Option<String>,
    /// On a larger target, grow every partition whose filesystem klon grows (ext2/3/4, NTFS, XFS, btrfs) by a
    /// share of the new room in proportion to its size, moving the ones after it (Clonezilla's -k1).
    #[arg(long, conflicts_with_all = ["partition", "grow_last"])]
    pub grow_all: bool,
    /// How the target is written.
    #[command(flatten)]
    pub write: WriteArgs,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `klon clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// Disk to copy: a block device or a file holding a disk image.
    pub source: PathBuf,
    /// Target: a block device, or a file (created with the source's size when missing).
    pub target: PathBuf,
    /// How the source is read.
    #[command(flatten)]
    pub read: ReadArgs,
    /// How the target is written.
    #[command(flatten)]
    pub write: WriteArgs,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `klon deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The image to send: a klon image directory, a repository's snapshot
    /// (REPO[:SNAPSHOT]) or a Clonezilla image (those two are written as a
    /// klon image first, under --export-dir).
    pub image: PathBuf,
    /// Send by multicast with udp-sender (the only way for now).
    #[arg(long, required = true)]
    pub multicast: bool,
    /// Start once this many receivers have joined.
    #[arg(long, value_name = "N")]
    pub clients: Option<u32>,
    /// Start at most this many seconds after the first receiver joined.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<u32>,
    /// Network interface to send on (udp-sender's --interface).
    #[arg(long, value_name = "IF")]
    pub interface: Option<String>,
    /// udpcast's port base (receivers must use the same); reports come to PORT+8.
    #[arg(long, default_value_t = crate::engine::deploy::DEFAULT_PORT)]
    pub port: u16,
    /// Most bits per second to send (udp-sender's --max-bitrate, e.g. 500m).
    #[arg(long, value_name = "RATE")]
    pub max_bitrate: Option<String>,
    /// How long to wait for the receivers' reports once everything is sent.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub report_wait: u64,
    /// Serve machines that join late or lose the multicast by unicast (TCP
    /// at the port base + 9), until this long after the multicast ended.
    #[arg(long, value_name = "SECONDS")]
    pub late: Option<u64>,
    /// Where a snapshot or a Clonezilla image is written as a klon image
    /// before it is sent (removed afterwards; default: the system's
    /// temporary directory).
    #[arg(long, value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
}

/// `klon receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Target: a block device, or a file (created with the source disk's size when missing).
    pub target: PathBuf,
    /// Receive by multicast with udp-receiver.
    #[arg(long, required = true)]
    pub multicast: bool,
    /// Network interface to listen on (udp-receiver's --interface).
    #[arg(long, value_name = "IF")]
    pub interface: Option<String>,
    /// udpcast's port base (the sender's).
    #[arg(long, default_value_t = crate::engine::deploy::DEFAULT_PORT)]
    pub port: u16,
    /// How the target is written (--yes is needed: the image is written as it arrives).
    #[command(flatten)]
    pub write: WriteArgs,
}

/// `klon serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve network boot (the only service for now).
    #[arg(long, required = true)]
    pub pxe: bool,
    /// The network interface the machines are on; it must have an IPv4 address.
    #[arg(long, value_name = "IF")]
    pub interface: String,
    /// klon's live stick, its image (target/klon-live.img), or a directory
    /// holding its files (live/vmlinuz, live/initrd.img).
    #[arg(long, value_name = "PATH")]
    pub live: PathBuf,
    /// Hand out addresses from START to END (full DHCP: no other DHCP server
    /// may be on the network). Without it: proxy DHCP beside the network's own.
    #[arg(long, value_name = "START,END", value_parser = parse_range)]
    pub dhcp_range: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// Added to every machine's kernel command line, e.g.
    /// "klon.job=receive klon.target=/dev/sda klon.after=poweroff".
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub append: String,
    /// The HTTP server's port (kernel and initramfs for iPXE, the stick's
    /// disk for UEFI HTTP boot).
    #[arg(long, value_name = "PORT", default_value_t = 8069)]
    pub http_port: u16,
    /// UEFI machines boot by UEFI HTTP boot only (the stick's disk over
    /// HTTP, booted as a RAM disk; no TFTP offered to them), for networks
    /// or firmware without TFTP. Needs --dhcp-range.
    #[arg(long)]
    pub uefi_http: bool,
}

fn parse_range(s: &str) -> std::result::Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), String> {
    let (a, b) = s.split_once(',').ok_or_else(|| format!("{s}: give START,END, e.g. 192.168.50.100,192.168.50.150"))?;
    let ip = |x: &str| x.trim().parse().map_err(|_| format!("{x}: not an IPv4 address"));
    Ok((ip(a)?, ip(b)?))
}

/// `klon info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image directory (klon's, or a Clonezilla image directory), or
    /// REPO[:SNAPSHOT] (default: the latest snapshot).
    pub image: PathBuf,
}

/// `klon mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Image directory (klon's), or REPO[:SNAPSHOT] (default: the latest snapshot).
    pub image: PathBuf,
    /// An empty directory to show the image's files in.
    pub dir: PathBuf,
    /// Serve in this process until unmounted or Ctrl-C, instead of in the background.
    #[arg(long)]
    pub foreground: bool,
    /// Also mount each partition's filesystem read-only on DIR/pN/ (no
    /// journal replayed); klon umount unmounts them too.
    #[arg(long)]
    pub mount_filesystems: bool,
}

/// `klon umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The directory klon mount mounted an image on.
    pub dir: PathBuf,
}

/// `klon convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Clonezilla image directory (holding `disk`, `parts`, `*-pt.sf`, `*-ptcl-img.*`).
    pub clonezilla_image: PathBuf,
    /// klon image directory to create (it must not exist yet), or a
    /// repository to add a snapshot to.
    pub image: PathBuf,
    /// Make IMAGE a repository if it is not one yet (it must not exist, or
    /// be empty), and the Clonezilla image a snapshot in it.
    #[arg(long)]
    pub repo: bool,
    /// A label for the snapshot (repositories only).
    #[arg(long)]
    pub label: Option<String>,
    /// A tag for the snapshot; may be given more than once (repositories only).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Bytes of the disk one chunk of a new repository covers (1M to 8M, a power of two).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    pub window: u64,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = crate::engine::backup::DEFAULT_LEVEL)]
    pub level: i32,
    /// Largest image file, e.g. 4000M, 2G, 700M (default 4000 MiB, fits FAT32).
    #[arg(long, value_parser = parse_size, default_value = "4000M")]
    pub split: u64,
    /// Skip reading the new image back to check it.
    #[arg(long)]
    pub no_verify: bool,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// `klon demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory for the sample disk, its image and the restored disk
    /// (default: a new directory under /tmp, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// A retention policy (`daily=7,weekly=4`), checked.
fn parse_keep(s: &str) -> Result<String, String> {
    crate::repo::Keep::parse(s).map(|_| s.to_string())
}

/// Parses sizes like "4000M", "2G", "512K", "1048576".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim_end_matches(['i', 'B', 'b']);
            let mult = match unit.to_ascii_uppercase().as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size unit (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (examples: 4000M, 2G)"))
}

/// `klon live …`: the live system's internal commands (hidden).
#[derive(Debug, Args)]
pub struct LiveArgs {
    /// What to run.
    #[command(subcommand)]
    pub what: LiveCommand,
}

/// The live system's internal commands.
#[derive(Debug, Subcommand)]
pub enum LiveCommand {
    /// A session on one console (PID 1 starts one per console).
    Console {
        /// The terminal, e.g. /dev/tty1 or /dev/ttyS0.
        tty: PathBuf,
        /// Start with a rescue shell.
        #[arg(long)]
        shell: bool,
    },
    /// Run the unattended job described in a klon.conf-style file.
    Job {
        /// The settings file (default: the one PID 1 wrote, /run/klon/job.conf).
        file: Option<PathBuf>,
    },
    /// List the filesystems that can hold images (not on the live stick).
    Drives,
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4000M"), Ok(4000 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("123"), Ok(123));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
    }
}
