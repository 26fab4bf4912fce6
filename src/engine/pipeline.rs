//! The ordered parallel pipeline every engine job runs on: one producer
//! thread (reads), a pool of workers (compress, decompress, hash) and the
//! consumer on the calling thread (writes), joined by bounded queues.
//!
//! At most `depth` items are in flight between producer and consumer, so
//! memory stays bounded whatever the disk size; the consumer sees items in
//! the order the producer made them.

use std::collections::BTreeMap;

use crossbeam_channel::{bounded, unbounded};

use crate::error::Result;

/// How many workers to run: one per core, at most 8 (each holds up to two
/// chunks in memory).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8)
}

/// How many items may be in flight for `workers` workers: one each, and
/// some for the reader to run ahead and the writer to work behind. With
/// 8 MiB chunks, 2 workers keep about 100 MiB in flight, 8 workers 200.
pub fn depth(workers: usize) -> usize {
    workers + 4
}

/// Runs `produce` on its own thread, `work` on `workers` threads and
/// `consume` on this one, in order. `produce` gets a `send` function that
/// returns false once the pipeline is shutting down (then it should return).
/// The first error from any stage stops the pipeline and is returned.
pub fn run<I, O, P, W, C>(workers: usize, depth: usize, produce: P, work: W, mut consume: C) -> Result<()>
where
    I: Send,
    O: Send,
    P: FnOnce(&mut dyn FnMut(I) -> bool) -> Result<()> + Send,
    W: Fn(I) -> Result<O> + Sync,
    C: FnMut(O) -> Result<()>,
{
    let workers = workers.max(1);
    let depth = depth.max(workers);
    let (credit_tx, credit_rx) = bounded::<()>(depth);
    for _ in 0..depth {
        credit_tx.send(()).expect("credit channel has room");
    }
    let (job_tx, job_rx) = bounded::<(u64, I)>(depth);
    let (res_tx, res_rx) = unbounded::<(u64, Result<O>)>();
    let work = &work;

    std::thread::scope(|scope| {
        let producer = scope.spawn(move || {
            let mut seq = 0u64;
            let mut send = |item: I| -> bool {
                if credit_rx.recv().is_err() {
                    return false;
                }
                let ok = job_tx.send((seq, item)).is_ok();
                seq += 1;
                ok
            };
            produce(&mut send)
            // job_tx dropped here: workers drain and stop.
        });
        for _ in 0..workers {
            let job_rx = job_rx.clone();
            let res_tx = res_tx.clone();
            scope.spawn(move || {
                for (seq, item) in job_rx.iter() {
                    if res_tx.send((seq, work(item))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(res_tx);

        let mut pending: BTreeMap<u64, Result<O>> = BTreeMap::new();
        let mut next = 0u64;
        let mut outcome: Result<()> = Ok(());
        'outer: for (seq, r) in res_rx.iter() {
            pending.insert(seq, r);
            while let Some(r) = pending.remove(&next) {
                next += 1;
                match r.and_then(&mut consume) {
                    Ok(()) => {
                        let _ = credit_tx.send(());
                    }
                    Err(e) => {
                        outcome = Err(e);
                        break 'outer;
                    }
                }
            }
        }
        // Unblock the producer and the workers if we stopped early.
        drop(credit_tx);
        drop(res_rx);
        let produced = producer.join().expect("producer thread panicked");
        outcome.and(produced)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn keeps_order_and_processes_all() {
        let mut seen = Vec::new();
        run(
            3,
            4,
            |send| {
                for i in 0..1000u64 {
                    if !send(i) {
                        break;
                    }
                }
                Ok(())
            },
            |i| {
                if i % 7 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                Ok(i * 2)
            },
            |o| {
                seen.push(o);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..1000u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn worker_error_stops_everything() {
        let mut consumed = 0;
        let r = run(
            2,
            2,
            |send| {
                for i in 0..1_000_000u64 {
                    if !send(i) {
                        return Ok(());
                    }
                }
                Ok(())
            },
            |i| if i == 10 { Err(Error::Corrupt("ten".into())) } else { Ok(i) },
            |_| {
                consumed += 1;
                Ok(())
            },
        );
        assert!(matches!(r, Err(Error::Corrupt(_))));
        assert_eq!(consumed, 10);
    }

    #[test]
    fn producer_error_is_returned() {
        let r = run(
            2,
            2,
            |send| {
                send(1u8);
                Err(Error::Usage("boom".into()))
            },
            Ok,
            |_| Ok(()),
        );
        assert!(matches!(r, Err(Error::Usage(_))));
    }
}
