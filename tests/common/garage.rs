//! A real S3-compatible server for the tests: Garage, started on
//! 127.0.0.1 with a generated configuration, one node, a bucket and a key
//! made with Garage's own CLI. Stopped (and its files removed) on drop.
//!
//! The binary is `$KLON_GARAGE`, else `garage` on the PATH. Without it
//! the tests skip, unless `KLON_REQUIRE_S3_TESTS=1` (CI): then they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::disks::TempDir;

/// Whether the S3 tests must run (env `KLON_REQUIRE_S3_TESTS=1`).
pub fn s3_tests_required() -> bool {
    std::env::var("KLON_REQUIRE_S3_TESTS").is_ok_and(|v| v == "1")
}

/// The Garage binary, if there is one.
pub fn garage_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("KLON_GARAGE") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("garage")).find(|p| p.is_file())
}

/// At the top of a test that needs Garage: the server, or (without the
/// binary) a panic when S3 tests are required, else a skip.
#[macro_export]
macro_rules! require_garage {
    ($t:expr) => {
        match $crate::common::garage::garage_binary() {
            Some(bin) => $crate::common::garage::Garage::start(bin, $t),
            None if $crate::common::garage::s3_tests_required() => {
                panic!("this test needs Garage and KLON_REQUIRE_S3_TESTS=1 is set: cargo install --locked garage")
            }
            None => {
                eprintln!("skipping: needs Garage (cargo install --locked garage, or KLON_GARAGE=PATH)");
                return;
            }
        }
    };
}

/// A running Garage server with a bucket `klon` and a key allowed on it.
pub struct Garage {
    bin: PathBuf,
    /// The network namespace it runs in (its CLI too), if any.
    netns: Option<String>,
    config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// The S3 endpoint, http://127.0.0.1:PORT.
    pub endpoint: String,
    /// The key's id and secret.
    pub key_id: String,
    /// The key's secret.
    pub secret: String,
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Garage {
    /// Starts a server whose files are under `t`, and makes the bucket
    /// and the key.
    pub fn start(bin: PathBuf, t: &TempDir) -> Garage {
        Garage::start_in(bin, t, None, "127.0.0.1")
    }

    /// [`Garage::start`] in network namespace `netns` (its loopback for
    /// the RPC and admin ports), the S3 API on `s3_addr`.
    pub fn start_in(bin: PathBuf, t: &TempDir, netns: Option<&str>, s3_addr: &str) -> Garage {
        let dir = t.join("garage");
        std::fs::create_dir_all(&dir).unwrap();
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let secret: String = super::disks::random_bytes(s3 as u64, 32).iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"{s3_addr}:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let mut g = Garage {
            bin,
            netns: netns.map(String::from),
            config,
            child: None,
            log: dir.join("garage.log"),
            endpoint: format!("http://{s3_addr}:{s3}"),
            key_id: String::new(),
            secret: String::new(),
        };
        g.run_server();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", "klon"]);
        let key = g.cli(&["key", "create", "klon-test"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in garage's answer:\n{key}"))
        };
        g.key_id = field("Key ID");
        g.secret = field("Secret key");
        g.cli(&["bucket", "allow", "--read", "--write", "--owner", "klon", "--key", "klon-test"]);
        g.wait_ready();
        g
    }

    fn run_server(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = self
            .command()
            .args(["-c", self.config.to_str().unwrap(), "server"])
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
        // The CLI answers once the RPC port does.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.command().args(["-c", self.config.to_str().unwrap(), "status"]).output().unwrap();
            if o.status.success() {
                return;
            }
            assert!(Instant::now() < until, "garage did not start: {}", std::fs::read_to_string(&self.log).unwrap());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Garage's binary, run in its network namespace when it has one.
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        }
    }

    /// Waits until the S3 API answers (the layout is applied).
    fn wait_ready(&self) {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let until = Instant::now() + Duration::from_secs(30);
        let answers = || match &self.netns {
            // (In a namespace: listening, as ss there tells.)
            Some(ns) => {
                let o = Command::new("ip").args(["netns", "exec", ns, "ss", "-ltn"]).output().unwrap();
                String::from_utf8_lossy(&o.stdout).contains(&format!("{addr} "))
            }
            None => std::net::TcpStream::connect(&addr).is_ok(),
        };
        while !answers() {
            assert!(Instant::now() < until, "garage's S3 port does not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs Garage's CLI; its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.command().arg("-c").arg(&self.config).args(args).output().unwrap();
        assert!(
            o.status.success(),
            "garage {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Stops the server (SIGKILL: as a crash or a pulled cable would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same files and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.run_server();
        self.wait_ready();
    }

    /// The environment klon is given to reach the bucket.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "garage".into()),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}
