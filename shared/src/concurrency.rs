//! Running borrowed futures concurrently with a bound, without spawning (so they may borrow the
//! app and the sender) and without the `futures` crate.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::Poll;

/// Runs `futures` with at most `limit` (at least 1) in flight, on the calling task, and returns
/// their outputs in input order. Each wake polls the (at most `limit`) running futures.
pub(crate) async fn join_bounded<I, F>(futures: I, limit: usize) -> Vec<F::Output>
where
    I: IntoIterator<Item = F>,
    F: Future,
{
    let limit = limit.max(1);
    let mut waiting = futures.into_iter().enumerate();
    let mut running: Vec<(usize, Pin<Box<F>>)> = Vec::with_capacity(limit);
    let mut done: Vec<(usize, F::Output)> = Vec::new();
    loop {
        while running.len() < limit {
            let Some((index, future)) = waiting.next() else {
                break;
            };
            running.push((index, Box::pin(future)));
        }
        if running.is_empty() {
            break;
        }
        // Resolves once at least one running future has finished, so the loop can start more.
        poll_fn(|cx| {
            let finished_before = done.len();
            let mut k = 0;
            while k < running.len() {
                if let Poll::Ready(output) = running[k].1.as_mut().poll(cx) {
                    let (index, _) = running.swap_remove(k);
                    done.push((index, output));
                } else {
                    k += 1;
                }
            }
            if done.len() > finished_before {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }
    done.sort_unstable_by_key(|(index, _)| *index);
    done.into_iter().map(|(_, output)| output).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn keeps_the_bound_runs_concurrently_and_keeps_order() {
        let in_flight = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let task = |n: u64| {
            let (in_flight, peak) = (&in_flight, &peak);
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                // Later inputs finish sooner, so completion order differs from input order.
                tokio::time::sleep(Duration::from_millis(100 - n)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                n * 10
            }
        };
        let out = join_bounded((0..20).map(task), 4).await;
        assert_eq!(out, (0..20).map(|n| n * 10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        // 20 tasks of ~100 ms, 4 at a time: ~5 rounds, not 20.
        assert!(started.elapsed() < Duration::from_millis(600));
    }

    #[tokio::test]
    async fn empty_input_and_a_zero_limit() {
        let none: Vec<u8> = join_bounded(Vec::<std::future::Ready<u8>>::new(), 3).await;
        assert!(none.is_empty());
        let out = join_bounded((0..3).map(std::future::ready), 0).await;
        assert_eq!(out, [0, 1, 2]);
    }
}
