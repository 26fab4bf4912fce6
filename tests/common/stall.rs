//! A proxy in front of an S3 server that stalls chosen requests: it reads
//! their headers and then neither reads their body nor answers, as a
//! server or a network path that hangs would. Everything else is passed
//! through, request by request (HTTP/1.1 with Content-Length bodies, as
//! klon's client sends them).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A running proxy; its thread ends with the test process.
pub struct Stall {
    /// http://127.0.0.1:PORT, to give klon as the endpoint.
    pub endpoint: String,
    /// How many more requests to stall.
    left: Arc<AtomicUsize>,
    /// The request lines stalled so far.
    pub stalled: Arc<Mutex<Vec<String>>>,
}

impl Stall {
    /// Proxies to `upstream` (http://HOST:PORT); stalls the first `count`
    /// requests whose request line contains `pattern`.
    pub fn start(upstream: &str, pattern: &'static str, count: usize) -> Stall {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let left = Arc::new(AtomicUsize::new(count));
        let stalled = Arc::new(Mutex::new(Vec::new()));
        let (l, s) = (left.clone(), stalled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (upstream, l, s) = (upstream.clone(), l.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(client, &upstream, pattern, &l, &s);
                });
            }
        });
        Stall { endpoint, left, stalled }
    }

    /// Stalls `count` more requests that match.
    pub fn arm(&self, count: usize) {
        self.left.store(count, Ordering::SeqCst);
    }
}

/// Passes one client connection's requests on, one at a time.
fn serve(
    client: TcpStream,
    upstream: &str,
    pattern: &str,
    left: &AtomicUsize,
    stalled: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream)?;
    // Answers go back as they come.
    let (mut from_server, mut to_client) = (server.try_clone()?, client.try_clone()?);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_server, &mut to_client);
        let _ = to_client.shutdown(std::net::Shutdown::Both);
    });
    let mut reader = BufReader::new(client);
    let mut to_server = server;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line)? == 0 {
                let _ = to_server.shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        let request_line = text.lines().next().unwrap_or("").to_string();
        if request_line.contains(pattern)
            && left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            stalled.lock().unwrap().push(request_line);
            // Hold the connection open, reading nothing; the thread
            // ends with the test process.
            let _held = reader;
            loop {
                std::thread::park();
            }
        }
        let length = text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<u64>().ok())?
            })
            .unwrap_or(0);
        to_server.write_all(&head)?;
        std::io::copy(&mut (&mut reader).take(length), &mut to_server)?;
    }
}
